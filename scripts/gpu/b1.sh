#!/usr/bin/env bash
# Device call 1 (nvidia-h200-x2, carry .stage/g1): keep GGUF part 1 on the machine; kernels benchmark on GPU 1
# while the 1-GPU training run of the multi-GPU comparison uses GPU 0; then the 2-GPU run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -f .stage/g1/smol.part.00 ]] && cp .stage/g1/smol.part.00 "$HOLD/"
cp .stage/g1/corpora/*.jsonl "$PRUNEPATH_CACHE/corpora/"
rm -f /tmp/kern.done
mkdir -p "$OUT/kern"
( if [[ -f scripts/gpu/kernels.sh ]]; then
      CUDA_VISIBLE_DEVICES=1 timeout "${KERN_TIMEOUT:-290}" bash scripts/gpu/kernels.sh "$OUT/kern" main \
          > "$OUT/kern/kernels.log" 2>&1 || echo "kernels exit $?" >> "$OUT/kern/kernels.log"
  fi; touch /tmp/kern.done ) &
log "multi-GPU comparison"
python3 benchmarks/multi_gpu_train.py --config-dir .stage/g1/smol-config --data mix:moby-dick,austen \
    --batch "${MG_BATCH:-16}" --seq-len 512 --steps "${MG_STEPS:-60}" --out-name multi-gpu-train-h200x2.json \
    --wait-file /tmp/kern.done 2>&1 | tee "$OUT/multi_gpu.log" || log "multi-GPU comparison failed"
wait
log "b1 done"
tar -C "$OUT" -czf "$OUT/kern.tgz" kern && rm -rf "$OUT/kern"
ls -la "$OUT"
