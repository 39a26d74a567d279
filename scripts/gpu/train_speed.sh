#!/usr/bin/env bash
# One device call (carry .stage/g3: SmolLM2's config + tokenizer, the moby-dick and austen corpora): where a study
# training step's time goes (benchmarks/train_step.py, random-init SmolLM2 shape; no GGUF needed).
#   mkdir -p .stage/g3/smol-config && cp ~/.cache/prunepath/models/smollm2-135m/{config.json,tokenizer*.json} \
#       .stage/g3/smol-config/ && tar -C ~/.cache/prunepath/corpora -czf .stage/g3/corpora.tar.gz moby-dick.jsonl austen.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tar -C "$PRUNEPATH_CACHE/corpora" -xzf .stage/g3/corpora.tar.gz
timeout "${TS_TIMEOUT:-450}" python3 benchmarks/train_step.py --config-dir .stage/g3/smol-config \
    --data mix:moby-dick,austen --steps "${TS_STEPS:-24}" ${TS_FLAGS:---before --pair} --out-name "${TS_NAME:-train-step-h200.json}" \
    2>&1 | tail -n 60 || log "train_step exit $?"
log "train_speed done"
