#!/usr/bin/env bash
# Device call 2 (carry .stage/g2, right after b1): join + dequantise SmolLM2, unpack corpora and data, run the LM
# study (both GPUs) until its deadline.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
unpack_support .stage/g2
stage_smollm2 .stage/g2/smol.part.01 .stage/g2/smol.sha256
if [[ -d .stage/g2/seed/jobs ]]; then  # finished jobs of an earlier call: kept, not re-run
    mkdir -p "${STUDY_WORK:-$HOLD/study-lm-smollm2}/jobs"
    cp -n .stage/g2/seed/jobs/*.json "${STUDY_WORK:-$HOLD/study-lm-smollm2}/jobs/"
    log "seeded finished jobs: $(ls .stage/g2/seed/jobs | tr '\n' ' ')"
fi
log "staged; study starts"
STUDY_DEADLINE_S="${STUDY_DEADLINE_S:-520}" TRAIN_TOKENS="${TRAIN_TOKENS:-10000000}" \
    bash scripts/gpu/study_lm.sh "$OUT/study" 2>&1 | tee "$OUT/study_b2.log" | tail -c 20000 || log "study exit $?"
log "b2 done"
tar -C "$OUT" -czf "$OUT/study.tgz" study && rm -rf "$OUT/study"
ls -la "$OUT"
