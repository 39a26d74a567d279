#!/usr/bin/env bash
# Device call 1 (carry .stage/g1): keep GGUF part 1 on the machine; the kernels benchmark; then training
# throughput: the 1-vs-2 GPU comparison when two GPUs are there, else the 1-GPU half (random-init SmolLM2 shape).
# With 2 GPUs the kernels run on GPU 1 beside the 1-GPU training run on GPU 0; with 1 GPU they run first, alone.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -f .stage/g1/smol.part.00 ]] && cp .stage/g1/smol.part.00 "$HOLD/"
cp .stage/g1/corpora/*.jsonl "$PRUNEPATH_CACHE/corpora/"
rm -f /tmp/kern.done
mkdir -p "$OUT/kern"
NGPU=$(nvidia-smi -L | wc -l)
kernels() {  # env KERN_PROFILES: density profiles (PATH#i, space-separated) timed after the main phase
    if [[ "${B1_KERNELS:-1}" != 1 ]]; then touch /tmp/kern.done; return 0; fi  # B1_KERNELS=0: staging only
    CUDA_VISIBLE_DEVICES=$(( NGPU - 1 )) timeout "${KERN_TIMEOUT:-290}" bash scripts/gpu/kernels.sh "$OUT/kern" main \
        > "$OUT/kern/kernels.log" 2>&1 || echo "kernels exit $?" >> "$OUT/kern/kernels.log"
    local n=0
    for prof in ${KERN_PROFILES:-}; do
        n=$(( n + 1 ))
        CUDA_VISIBLE_DEVICES=$(( NGPU - 1 )) KERN_PROFILE_TAG="-$n" timeout "${KERN_PROFILE_TIMEOUT:-150}" \
            bash scripts/gpu/kernels.sh "$OUT/kern" profile "$prof" > "$OUT/kern/kernels-profile-$n.log" 2>&1 \
            || echo "kernels profile exit $?" >> "$OUT/kern/kernels-profile-$n.log"
    done
    touch /tmp/kern.done
}
if (( NGPU >= 2 )); then
    kernels &
    MG=(--wait-file /tmp/kern.done --out-name multi-gpu-train-h200x2.json)
else
    log "one GPU: kernels first"; kernels; log "kernels done"
    MG=(--one-gpu-only --out-name train-throughput-h200.json)
fi
if [[ "${B1_TRAIN:-1}" != 1 ]]; then  # B1_TRAIN=0: kernels only (the 1-GPU throughput is already measured)
    wait; log "b1 done (kernels only)"; tar -C "$OUT" -czf "$OUT/kern.tgz" kern && rm -rf "$OUT/kern"; ls -la "$OUT"; exit 0
fi
log "training throughput"
python3 benchmarks/multi_gpu_train.py --config-dir .stage/g1/smol-config --data mix:moby-dick,austen \
    --batch "${MG_BATCH:-16}" --seq-len 512 --steps "${MG_STEPS:-40}" "${MG[@]}" 2>&1 | tee "$OUT/multi_gpu.log" \
    || log "training throughput run failed"
wait
log "b1 done"
tar -C "$OUT" -czf "$OUT/kern.tgz" kern && rm -rf "$OUT/kern"
ls -la "$OUT"
