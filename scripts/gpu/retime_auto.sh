#!/usr/bin/env bash
# The engine's small-layer rule end to end (docs/decode.md, "The plain FFN and small layers"): SmolLM2 converted
# to 16-neuron ungated experts (router as converted, untrained), decoded at τ < 1 with ffn "auto" (dense-equivalent
# below sparse_min_bytes) and with the sparse expert kernels forced, against the original. Two device calls:
#   call 1 (carry .stage/g1): bash scripts/gpu/r4.sh hold
#   call 2 (carry .stage/g2): bash scripts/gpu/retime_auto.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export PRUNEPATH_DATA="$DATA_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ ! -f "$PRUNEPATH_CACHE/models/smollm2-135m/config.json" ]]; then
    unpack_support .stage/g2
    stage_smollm2 .stage/g2/smol.part.01 .stage/g2/smol.sha256
    log "staged"
fi
CKPT="$HOLD/ckpt-n16-untrained"
if [[ ! -f "$CKPT/prunepath_config.json" ]]; then
    python3 - "$CKPT" <<'PY'
import sys
import prunepath
model, tok = prunepath.load_model("smollm2-135m")
prunepath.moefy(model, neurons_per_expert=16, progress=False)
prunepath.configure(model, tau=1.05, gates=False)
prunepath.save(model, sys.argv[1], tokenizer=tok)
PY
    log "converted"
fi
timeout "${RETIME_S:-300}" python3 benchmarks/decode_checkpoint.py --checkpoint "$CKPT" --original smollm2-135m \
    --tau 1.05 --inner "" --points "${RETIME_POINTS:-0.95:0,0.9:0,0.8:0,0.9:0.3}" --sparse-ab --mid-bias 0.15 \
    --out "$OUT/decode-checkpoint-h200-auto-ab.json" 2>&1 | grep -v "it/s\]" | tail -n 30 || log "decode_checkpoint exit $?"
log "retime_auto done"
