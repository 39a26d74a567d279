#!/usr/bin/env bash
# Expert granularity at a CPU budget on SmolLM2-135M-Instruct (Q4_1, dequantised): round 8's ungated recipe with
# 32 and 64 neurons per expert (16 is the ungated run of scripts/round8_gates_cpu.sh, the same flags otherwise),
# same seed (same batches and draws), 40 steps x 1,024 tokens each (both side by side: about 20 min on 2 cores),
# then perplexity on the first 16,384 WikiText-2 validation tokens (bf16).
# Writes OUT/n{32,64}/ (checkpoints) and OUT/*.json; docs/results/granularity-cpu-smollm2.json gathers them.
#   bash scripts/granularity_cpu.sh [OUT]
set -euo pipefail
OUT="${1:-runs/granularity-cpu}"
SIZES="${SIZES:-32 64}"
mkdir -p "$OUT"
COMMON=(--model smollm2-135m --task lm --data mix:sotu,moby-dick,austen,brown --seq-len 256 --batch-size 4
        --stage1-steps 8 --stage2-steps 32 --tau-schedule sample --tau-min 0.5
        --tau-all-prob 0.25 --inner-sparsity-max 0.6 --inner-off-prob 0.125 --inner-mid-bias 0.15
        --warmstart-steps 200 --warmstart-lr 0.01 --distill 1.0 --router-distill 1.0 --lr-scheduler cosine
        --warmup-steps 4 --precision fp32 --seed 0 --device cpu --log-every 2 --save-every 10 --no-progress
        --max-eval-tokens 2048 --no-gates)
for n in $SIZES; do
    OMP_NUM_THREADS=1 prunepath train "${COMMON[@]}" --neurons-per-expert "$n" --out "$OUT/n$n" > "$OUT/n$n.log" 2>&1 &
done
wait
source "$(dirname "${BASH_SOURCE[0]}")/cpu_eval_points.sh"
for n in $SIZES; do eval_points "$OUT/n$n" "$OUT" "n$n"; done
