#!/usr/bin/env bash
# Study round 8 at a CPU budget on SmolLM2-135M-Instruct (Q4_1, dequantised): gated vs ungated experts, same seed
# (same batches, τ and in-expert draws), 40 steps × 1,024 tokens each (both side by side: about 20 min on 2 cores),
# then perplexity on the first 16,384 WikiText-2 validation tokens (bf16; about 10 min).
# Writes OUT/{gated,ungated}/ (checkpoints) and OUT/*.json; docs/results/round8-gates-cpu-smollm2.json gathers them.
#   bash scripts/round8_gates_cpu.sh [OUT]
set -euo pipefail
OUT="${1:-runs/round8-gates-cpu}"
mkdir -p "$OUT"
COMMON=(--model smollm2-135m --task lm --data mix:sotu,moby-dick,austen,brown --seq-len 256 --batch-size 4
        --stage1-steps 8 --stage2-steps 32 --neurons-per-expert 16 --tau-schedule sample --tau-min 0.5
        --tau-all-prob 0.25 --inner-sparsity-max 0.6 --inner-off-prob 0.125 --inner-mid-bias 0.15
        --warmstart-steps 200 --warmstart-lr 0.01 --distill 1.0 --router-distill 1.0 --lr-scheduler cosine
        --warmup-steps 4 --precision fp32 --seed 0 --device cpu --log-every 2 --save-every 10 --no-progress
        --max-eval-tokens 2048)
OMP_NUM_THREADS=1 prunepath train "${COMMON[@]}" --gate-offset 4.0 --out "$OUT/gated" > "$OUT/gated.log" 2>&1 &
OMP_NUM_THREADS=1 prunepath train "${COMMON[@]}" --no-gates --out "$OUT/ungated" > "$OUT/ungated.log" 2>&1 &
wait
source "$(dirname "${BASH_SOURCE[0]}")/cpu_eval_points.sh"
prunepath eval --model smollm2-135m "${E[@]}" --json "$OUT/orig.json"
for run in ungated gated; do eval_points "$OUT/$run" "$OUT" "$run"; done
python scripts/paired_logs.py "$OUT/gated/train_log.jsonl" "$OUT/ungated/train_log.jsonl" --windows 0,100
