#!/usr/bin/env bash
# Device call 3 (carry .stage/g3, right after b2): the LM study continues (resume) on both GPUs while the NLU
# study runs beside it on GPU 1; then the realistic-density decode rows from the study's density profile.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cp -rn .stage/g3/data/* "$DATA_DIR/" 2>/dev/null || true
mkdir -p "$OUT/nlu" "$OUT/study" "$OUT/kern2"
nlu_pid=
if [[ "${NLU:-1}" == 1 ]]; then  # NLU=0: the LM study alone
( CUDA_VISIBLE_DEVICES=$(( $(nvidia-smi -L | wc -l) - 1 )) NLU_DEADLINE_S="${NLU_DEADLINE_S:-400}" NLU_MODEL_DIR="$ROOT/.stage/g3/minilm-l6" \
      bash scripts/gpu/nlu.sh "$OUT/nlu" > "$OUT/nlu/nlu_stdout.log" 2>&1 || echo "nlu exit $?" >> "$OUT/nlu/nlu_stdout.log" ) &
nlu_pid=$!
fi
STUDY_DEADLINE_S="${STUDY_DEADLINE_S:-420}" TRAIN_TOKENS="${TRAIN_TOKENS:-10000000}" \
    bash scripts/gpu/study_lm.sh "$OUT/study" 2>&1 | tee "$OUT/study_b3.log" | tail -c 15000 || log "study exit $?"
[[ -n "$nlu_pid" ]] && { wait "$nlu_pid" || true; }
log "study + nlu done"
profile=$(ls "$OUT"/study/density-profile-smollm2.json "$HOLD"/study-lm-smollm2/results/density-profile-smollm2.json 2>/dev/null | head -1 || true)
if [[ -n "$profile" && -f scripts/gpu/kernels.sh && $(elapsed) -lt "${KERN_START_BEFORE_S:-470}" ]]; then
    CUDA_VISIBLE_DEVICES=$(( $(nvidia-smi -L | wc -l) - 1 )) timeout 100 bash scripts/gpu/kernels.sh "$OUT/kern2" profile "$profile" \
        > "$OUT/kern2/kernels_profile.log" 2>&1 || log "kernels profile exit $?"
else
    log "no density profile or no time: skipped the realistic-density decode rows"
fi
for d in nlu study kern2; do tar -C "$OUT" -czf "$OUT/$d.tgz" "$d" && rm -rf "$OUT/$d"; done
ls -la "$OUT"
log "b3 done"
