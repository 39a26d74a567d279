# Shared setup for the batched GPU calls (b1.sh, b2.sh, b3.sh). Sourced, not run.
# Files outside the repo copy survive between back-to-back device calls while the machine is held: /root/hold.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export HOLD=/root/hold
export PRUNEPATH_CACHE="$HOLD/cache"
export DATA_DIR="$HOLD/data"
export PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-/tmp/out}"
mkdir -p "$HOLD" "$PRUNEPATH_CACHE/corpora" "$PRUNEPATH_CACHE/models" "$DATA_DIR" "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu $(date +%H:%M:%S) +$(elapsed)s] $*"; }
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader || true

stage_smollm2() {  # join the two GGUF halves, check, dequantise into the cache as smollm2-135m
    local part1="$HOLD/smol.part.00" part2="$1" sha="$2"
    [[ -f "$part1" ]] || { echo "part 1 missing: the machine was given back since b1; rerun b1 then b2" >&2; exit 3; }
    [[ -f "$PRUNEPATH_CACHE/models/smollm2-135m/config.json" ]] && return 0
    mkdir -p "$HOLD/gguf"
    cat "$part1" "$part2" > "$HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat "$sha")  $HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || { echo "hash mismatch" >&2; exit 4; }
    python3 - "$HOLD/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" <<'PY'
import sys
from pathlib import Path
from prunepath.models.registry import _gguf_to_safetensors, cache_dir
final = cache_dir() / "models" / "smollm2-135m"
tmp = final.with_name(".smollm2-135m-staging")
tmp.mkdir(parents=True, exist_ok=True)
_gguf_to_safetensors(Path(sys.argv[1]), tmp)
tmp.rename(final)
print("model ready:", final, sorted(p.name for p in final.iterdir()))
PY
}
