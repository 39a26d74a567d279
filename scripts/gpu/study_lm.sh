#!/usr/bin/env bash
# The LM study on the GPU machine: scripts/gpu/study_lm.sh OUTDIR
#   env: STUDY_DEADLINE_S (seconds from now for the whole script, default 520), TRAIN_TOKENS (default 10^7),
#        PRUNEPATH_CACHE (models/smollm2-135m, corpora/*.jsonl), DATA_DIR (wikitext-2/, xsum-sample/, alpaca-sample/),
#        STUDY_WORK (resumable state, default /root/hold/study-lm-smollm2), PROCS_PER_GPU (default 3),
#        STUDY_RECIPE (default recipes/study-lm-smollm2.yaml), MERGE_MARGIN_S (default 25).
# Runs NGPU x PROCS_PER_GPU shards of `prunepath run RECIPE --shard i/n` (chains of jobs, disjoint), each stopping
# cleanly (checkpointed) before the deadline; then merges and copies the small results into OUTDIR. Running it
# again with the same arguments continues where it stopped (state in STUDY_WORK).
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUTDIR="${1:?usage: scripts/gpu/study_lm.sh OUTDIR}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
DEADLINE_S="${STUDY_DEADLINE_S:-520}"
TRAIN_TOKENS="${TRAIN_TOKENS:-10000000}"
WORK="${STUDY_WORK:-/root/hold/study-lm-smollm2}"
RECIPE="${STUDY_RECIPE:-recipes/study-lm-smollm2.yaml}"
PPG="${PROCS_PER_GPU:-3}"
MARGIN="${MERGE_MARGIN_S:-25}"
export PRUNEPATH_DATA="${PRUNEPATH_DATA:-${DATA_DIR:-$ROOT/../shared/data}}"
export PYTHONPATH="/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[study_lm $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$WORK/logs" "$OUTDIR"
[[ -f "$PRUNEPATH_DATA/wikitext-2/wiki.valid.raw" ]] || { echo "no $PRUNEPATH_DATA/wikitext-2/wiki.valid.raw: set DATA_DIR" >&2; exit 2; }
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L | wc -l); DEVICE=cuda
else
    NGPU=1; DEVICE=cpu; PPG=1
fi
N=$(( NGPU * PPG ))
CALL=$(date +%Y%m%d-%H%M%S)
left=$(( DEADLINE_S - MARGIN - ($(date +%s) - T0) ))
log "device $DEVICE x $NGPU, $N shard(s), train_tokens $TRAIN_TOKENS, ${left}s for the shards, work $WORK"
pids=()
for (( i = 0; i < N; i++ )); do
    gpu=$(( i % NGPU ))
    # the driver stops itself before the deadline; `timeout` is only the backstop (checkpoints are atomic)
    CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$(( ( $(nproc) / N ) > 0 ? $(nproc) / N : 1 )) \
        timeout -k 5 $(( left + 40 )) python3 -m prunepath.cli.main run "$RECIPE" --out "$WORK" --device "$DEVICE" --shard "$i/$N" \
        --deadline-s "$left" --train-tokens "$TRAIN_TOKENS" --no-merge --no-progress \
        > "$WORK/logs/shard-$i-$CALL.log" 2>&1 &
    pids+=($!)
done
rc_all=0
for (( i = 0; i < N; i++ )); do
    if wait "${pids[$i]}"; then log "shard $i/$N finished"; else rc=$?; rc_all=$rc; log "shard $i/$N exit $rc (see logs/shard-$i-$CALL.log)"; tail -n 15 "$WORK/logs/shard-$i-$CALL.log" || true; fi
done
for (( i = 0; i < N; i++ )); do echo "--- shard $i"; grep -E "^\[study|Error|error" "$WORK/logs/shard-$i-$CALL.log" | tail -n 40 || true; done
python3 -m prunepath.cli.main run "$RECIPE" --out "$WORK" --merge-only --no-progress 2>&1 | tail -n 20 \
    || log "merge failed"
cp "$WORK"/results/*.json "$WORK"/results/*.jsonl "$OUTDIR"/ 2>/dev/null || true
( cd "$WORK" && tar -czf "$OUTDIR/study-lm-state.tgz" $(ls -d logs jobs partial failed study.json ckpt/*/train_log.jsonl \
    ckpt/*/train_result.json ckpt/*/train_config.json 2>/dev/null) ) || log "state tar failed"
ls -la "$OUTDIR"
log "done (shards rc $rc_all)"
exit 0
