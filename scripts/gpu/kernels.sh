#!/usr/bin/env bash
# Decode-kernel benchmarks on one GPU (issue 6). Run from anywhere; PYTHONPATH=src and CUDA_VISIBLE_DEVICES are
# set by the caller.
#   scripts/gpu/kernels.sh OUTDIR main                  # <= 4.5 min: checks, FFN stack, crossover, end to end
#   scripts/gpu/kernels.sh OUTDIR profile PROFILE_JSON  # <= 90 s: realistic-density rows only
# Each step has a deadline (measure-and-stop inside the scripts) and a hard timeout; results are written
# atomically after every record, so a killed step still leaves its data. Files land in OUTDIR:
#   main:    ffn-stack-h200.json, decode-h200.json, ffn-stack.log, decode.log
#   profile: ffn-stack-h200-profile.json, decode-h200-profile.json, ffn-stack-profile.log, decode-profile.log
set -euo pipefail
export PYTHONUNBUFFERED=1
OUTDIR=${1:?usage: kernels.sh OUTDIR [main|profile PROFILE_JSON]}
PHASE=${2:-main}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/src"
T0=$(date +%s)
at() { echo $((T0 + $1)); }                        # epoch deadline, seconds after the start
left() { local l=$(( T0 + $1 - $(date +%s) )); (( l > 5 )) && echo "$l" || echo 5; }  # hard timeout to a mark
log() { echo "[kernels.sh +$(( $(date +%s) - T0 ))s] $*"; }
# KERNELS_SMOKE=1: the same control flow on a CPU (TRITON_INTERPRET=1, tiny shapes) to test this script.
if [[ "${KERNELS_SMOKE:-0}" == 1 ]]; then
  FFN_SHAPES=tiny; DEC_SHAPES=llama3-8b; FFN_X=(--smoke); DEC_X=(--tiny --prompt 8 --new 4 --hf-new 3)
  FFN_B=1,2; DEC_B=1; DENS=1.0,0.3; XB=1,2
else
  FFN_SHAPES=${KERN_FFN_SHAPES:-llama3-8b,smollm2-135m,gpt2-medium,qwen2-7b}
  DEC_SHAPES=${KERN_DEC_SHAPES:-llama3-8b,smollm2-135m,gpt2-medium,qwen2-7b}
  FFN_X=(); DEC_X=(--prompt 512 --new 128 --hf-new 8); FFN_B=1,8; DEC_B=1,8; DENS=1.0,0.5,0.3,0.1; XB=1,2,4,8
fi
# KERN_AUTO_ONLY=1: end to end, only the path ffn="auto" picks per batch and density (+ sparse at d = 1.0):
# every shape fits one call. Stage deadlines (seconds after the start) can be moved with KERN_FFN_S / KERN_DEC_S.
[[ "${KERN_AUTO_ONLY:-0}" == 1 ]] && DEC_X+=(--auto-only --no-legacy)
FFN_S=${KERN_FFN_S:-95}; DEC_S=${KERN_DEC_S:-240}
PROF_DEC_SHAPES=${KERN_PROFILE_DEC_SHAPES:-smollm2-135m}; PROF_FFN_S=${KERN_PROF_FFN_S:-35}; PROF_DEC_S=${KERN_PROF_DEC_S:-75}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" || true

case "$PHASE" in
  main)
    # 1) FFN stack (router included), old vs new paths, batch 1 and 8, + the sparse/dense crossover (Llama-3-8B).
    log "ffn stack"
    timeout -k 5 "$(left $((FFN_S + 17)))" python3 benchmarks/ffn_stack.py "${FFN_X[@]}" --shapes "$FFN_SHAPES" \
        --batches "$FFN_B" --densities "$DENS" --modes sparse,dense,dense_legacy,dense_bf16 \
        --crossover "$XB" --crossover-densities 0.3,0.1 --deadline "$(at "$FFN_S")" --tag h200 --out "$OUTDIR" \
        > "$OUTDIR/ffn-stack.log" 2>&1 || log "ffn stack exited with $? (partial results kept)"
    tail -n 60 "$OUTDIR/ffn-stack.log" || true
    # 2) End to end: HF eager (8 tokens), dense CUDA graph, PrunePath sparse / dense-equivalent / legacy; prefill.
    log "end-to-end decode"
    timeout -k 5 "$(left $((DEC_S + 22)))" python3 benchmarks/decode.py "${DEC_X[@]}" --shapes "$DEC_SHAPES" \
        --batches "$DEC_B" --densities "$DENS" --grouped-densities 0.3 \
        --deadline "$(at "$DEC_S")" --tag h200 --out "$OUTDIR" \
        > "$OUTDIR/decode.log" 2>&1 || log "decode exited with $? (partial results kept)"
    tail -n 80 "$OUTDIR/decode.log" || true
    ;;
  profile)
    PROFILE=${3:?usage: kernels.sh OUTDIR profile PROFILE_JSON}
    PROFILE=$(cd "$(dirname "$PROFILE")" && pwd)/$(basename "$PROFILE")
    log "ffn stack, realistic density ($PROFILE)"
    [[ "${KERNELS_SMOKE:-0}" == 1 ]] && PS=tiny || PS=smollm2-135m,llama3-8b
    timeout -k 5 "$(left $((PROF_FFN_S + 10)))" python3 benchmarks/ffn_stack.py "${FFN_X[@]}" --shapes "$PS" \
        --density-profile "$PROFILE" --profile-batches 1 --deadline "$(at "$PROF_FFN_S")" --tag "h200-profile${KERN_PROFILE_TAG:-}" \
        --out "$OUTDIR" > "$OUTDIR/ffn-stack-profile${KERN_PROFILE_TAG:-}.log" 2>&1 || log "ffn stack exited with $?"
    tail -n 20 "$OUTDIR/ffn-stack-profile${KERN_PROFILE_TAG:-}.log" || true
    log "end-to-end decode, realistic density"
    timeout -k 5 "$(left $((PROF_DEC_S + 9)))" python3 benchmarks/decode.py "${DEC_X[@]}" --hf-new 0 --shapes "$PROF_DEC_SHAPES" \
        --batches 1 --density-profile "$PROFILE" --deadline "$(at "$PROF_DEC_S")" --tag "h200-profile${KERN_PROFILE_TAG:-}" \
        --out "$OUTDIR" > "$OUTDIR/decode-profile${KERN_PROFILE_TAG:-}.log" 2>&1 || log "decode exited with $?"
    tail -n 20 "$OUTDIR/decode-profile${KERN_PROFILE_TAG:-}.log" || true
    ;;
  *) echo "unknown phase $PHASE (main | profile PROFILE_JSON)" >&2; exit 2 ;;
esac
log "done"
ls -la "$OUTDIR"
