#!/usr/bin/env bash
# After a round's training on a held GPU machine (scripts/gpu/r4.sh run): the threshold-kernel benchmark on the
# quiet GPU, then the decode speed of the trained checkpoint's in-expert threshold points against the original.
#   BENCH_RUN=r8-split-n16-nogates-s1 bash scripts/gpu/bench_ckpt.sh       (carry nothing: the state is in /root/hold)
# BENCH_STACK=1 first times the plain (no-router) FFN paths (fused vs PyTorch, expert layout vs one expert);
# BENCH_POINTS adds τ:f rows (τ < 1: expert skipping, with or without in-expert thresholds).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${STUDY_WORK:-$HOLD/study-r4}"
RUN="${BENCH_RUN:-r8-split-n16-nogates-s1}"
export PRUNEPATH_DATA="$DATA_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/r4"
if [[ "${BENCH_KERNELS:-1}" == 1 ]]; then
    timeout "${BENCH_KERNELS_S:-240}" python3 benchmarks/threshold_ffn.py --shapes smollm2,llama3-8b \
        --sparsities 0.3,0.4,0.5,0.6 --engine smollm2 ${BENCH_KERNEL_ARGS:-} --out "$OUT/r4/threshold-ffn-h200.json" \
        > "$OUT/r4/threshold-ffn.log" 2>&1 || log "threshold_ffn exit $?"
    tail -n 60 "$OUT/r4/threshold-ffn.log"
fi
if [[ "${BENCH_STACK:-0}" == 1 ]]; then
    timeout "${BENCH_STACK_S:-150}" python3 benchmarks/ffn_stack.py --shapes smollm2,llama3-8b \
        --neurons-per-expert 16,32,64 --batches 1 --densities 1.0 --modes plain,plain-1,cublas-1 --rep-ms 100 \
        --out "$OUT/r4/ffn-stack-h200-plain.json" > "$OUT/r4/ffn-stack-plain.log" 2>&1 || log "ffn_stack exit $?"
    grep -v "^\s*$" "$OUT/r4/ffn-stack-plain.log" | tail -n 40
fi
if [[ "${BENCH_CKPT:-1}" != 1 ]]; then
    log "checkpoint decode skipped (BENCH_CKPT=0)"
elif [[ -f "$WORK/ckpt/$RUN/prunepath_config.json" ]]; then
    timeout "${BENCH_CKPT_S:-180}" python3 benchmarks/decode_checkpoint.py --checkpoint "$WORK/ckpt/$RUN" \
        --original smollm2-135m --tau 1.05 --inner 0.3,0.4,0.5 --mid-bias 0.15 --points "${BENCH_POINTS:-}" \
        --out "$OUT/r4/decode-checkpoint-h200.json" 2>&1 | grep -v "it/s\]" | tail -n 30 || log "decode_checkpoint exit $?"
else
    log "no finished checkpoint at $WORK/ckpt/$RUN"; ls "$WORK/ckpt/$RUN" 2>/dev/null | head
fi
log "bench_ckpt done"
