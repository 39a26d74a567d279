#!/usr/bin/env bash
# The NLU study on one GPU: scripts/gpu/nlu.sh OUTDIR
#   env: NLU_DEADLINE_S (seconds from now for the whole script, default 400), DATA_DIR (holds sst2/ mrpc/ rte/
#        cola/), PRUNEPATH_CACHE (models/minilm-l6 is installed there from NLU_MODEL_DIR if absent),
#        NLU_MODEL_DIR (default .stage/g3/minilm-l6, built by scripts/gpu/pack_nlu.sh), NLU_RECIPE (default
#        recipes/study-nlu-minilm.yaml), NLU_WORK (resumable state, default $HOLD or /tmp + /study-nlu-minilm),
#        NLU_DEVICE (default cuda), NLU_MARGIN_S (seconds kept for copying results, default 15).
# Runs prunepath nlu-study (units in priority order, each skipped when it would not fit before
# the deadline; hard-stopped by `timeout` as a last resort: the record list is rewritten atomically after every
# unit, so it is always valid JSON), then copies into OUTDIR: nlu-minilm.json (records), nlu-minilm.md (tables),
# study-nlu-minilm.png (plot), nlu-status.json (skipped units, timings), nlu.log.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUTDIR="${1:?usage: scripts/gpu/nlu.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
DEADLINE_S="${NLU_DEADLINE_S:-400}"
MARGIN="${NLU_MARGIN_S:-15}"
RECIPE="${NLU_RECIPE:-recipes/study-nlu-minilm.yaml}"
WORK="${NLU_WORK:-${HOLD:-/tmp}/study-nlu-minilm}"
DEVICE="${NLU_DEVICE:-cuda}"
MODEL_SRC="${NLU_MODEL_DIR:-$ROOT/.stage/g3/minilm-l6}"
export PYTHONPATH="${PYTHONPATH:-$ROOT/src}"
case ":$PYTHONPATH:" in *":$ROOT/src:"*) ;; *) export PYTHONPATH="$ROOT/src:$PYTHONPATH" ;; esac
export DATA_DIR="${DATA_DIR:-$ROOT/.stage/g3/data}"
export PRUNEPATH_CACHE="${PRUNEPATH_CACHE:-$HOME/.cache/prunepath}"
export PRUNEPATH_DATA="${PRUNEPATH_DATA:-$DATA_DIR}"
log() { echo "[nlu.sh $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUTDIR" "$WORK"
LOG="$OUTDIR/nlu.log"
: > "$LOG"

for t in sst2/stsa.binary.train mrpc/train.tsv rte/train.tsv cola/in_domain_train.tsv; do
    [[ -f "$DATA_DIR/$t" ]] || { echo "error: no $DATA_DIR/$t: set DATA_DIR to the copied .stage/g3/data" | tee -a "$LOG" >&2; exit 2; }
done
MODEL_DIR="$PRUNEPATH_CACHE/models/minilm-l6"
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    [[ -f "$MODEL_SRC/config.json" ]] || { echo "error: no model in $MODEL_DIR nor $MODEL_SRC: run scripts/gpu/pack_nlu.sh and carry .stage/g3" | tee -a "$LOG" >&2; exit 2; }
    mkdir -p "$PRUNEPATH_CACHE/models"
    rm -rf "$MODEL_DIR.tmp" && cp -r "$MODEL_SRC" "$MODEL_DIR.tmp" && mv "$MODEL_DIR.tmp" "$MODEL_DIR"
    log "installed $MODEL_SRC as $MODEL_DIR" | tee -a "$LOG"
fi
# The name records carry: the packed weights are fp16 (run in the recipe's precision, fp32 by default).
DISPLAY=$(python3 - "$MODEL_DIR/model.safetensors" <<'PY'
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    half = any(str(f.get_slice(k).get_dtype()) in ("F16", "float16") for k in list(f.keys())[:8])
print("all-MiniLM-L6-v2 (sentence-transformers; fp16 transfer, run in fp32)" if half else "all-MiniLM-L6-v2 (float32)")
PY
)
left=$(( DEADLINE_S - MARGIN - ($(date +%s) - T0) ))
(( left > 20 )) || { echo "error: only ${left}s left before the deadline" | tee -a "$LOG" >&2; exit 3; }
log "device $DEVICE, recipe $RECIPE, work $WORK, model '$DISPLAY', ${left}s for the study" | tee -a "$LOG"
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null | tee -a "$LOG" || true
set +e
timeout --signal=TERM --kill-after=5 "$left" \
    python3 -m prunepath.cli.main nlu-study "$RECIPE" --device "$DEVICE" --out "$WORK" --no-progress \
        --display-name "$DISPLAY" --data-dir "$DATA_DIR" --deadline-s "$(( left - 5 ))" >> "$LOG" 2>&1
rc=$?
set -e
log "study exited with status $rc" | tee -a "$LOG"
if [[ -f "$WORK/nlu-minilm.json" ]]; then
    cp "$WORK/nlu-minilm.json" "$OUTDIR/nlu-minilm.json"
    [[ -f "$WORK/status.json" ]] && cp "$WORK/status.json" "$OUTDIR/nlu-status.json"
    python3 -m prunepath.cli.main nlu-study --report "$WORK/nlu-minilm.json" --plot "$OUTDIR/study-nlu-minilm.png" \
        > "$OUTDIR/nlu-minilm.md" 2>> "$LOG" || log "report failed (records are in nlu-minilm.json)" | tee -a "$LOG"
    log "records: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$OUTDIR/nlu-minilm.json")" | tee -a "$LOG"
else
    log "no records written" | tee -a "$LOG"
fi
tail -n 40 "$LOG"
exit $(( rc == 0 ? 0 : (rc == 124 || rc == 137 ? 0 : rc) ))
