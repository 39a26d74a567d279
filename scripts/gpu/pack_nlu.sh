#!/usr/bin/env bash
# Build .stage/g3/ (git-ignored) for the NLU study's GPU call (scripts/gpu/nlu.sh):
#   .stage/g3/minilm-l6/  all-MiniLM-L6-v2 converted to fp16 safetensors (+ config, tokenizer), ~45 MB
#   .stage/g3/data/       sst2 mrpc rte cola xsum-sample alpaca-sample wikitext-2 from the shared data folder
# The device call carries at most ~60 MiB: the script fails if the folder exceeds 58 MiB.
#   usage: bash scripts/gpu/pack_nlu.sh        (env: PRUNEPATH_DATA = shared data folder, PRUNEPATH_CACHE)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STAGE="$ROOT/.stage/g3"
DATA_SRC="${PRUNEPATH_DATA:-$ROOT/../shared/data}"
LIMIT_MIB=58

cd "$ROOT"
git check-ignore -q .stage/g3 || { echo "error: .stage/ is not git-ignored; add /.stage/ to .gitignore" >&2; exit 2; }
for d in sst2 mrpc rte cola xsum-sample alpaca-sample wikitext-2; do
    [ -d "$DATA_SRC/$d" ] || { echo "error: $DATA_SRC/$d missing; set PRUNEPATH_DATA to the shared data folder" >&2; exit 2; }
done

TMP="$ROOT/.stage/.g3.tmp"
rm -rf "$TMP" && mkdir -p "$TMP/data"
# The model: resolved through the registry (cached under $PRUNEPATH_CACHE, fetched once if missing), cast to fp16.
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" python3 - "$TMP/minilm-l6" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prunepath.models.registry import builtin_path

src, dst = builtin_path("minilm-l6"), Path(sys.argv[1])
dst.mkdir(parents=True)
for p in src.iterdir():
    if p.is_file() and p.name != "model.safetensors" and p.suffix not in (".bin", ".pt", ".onnx", ".h5"):
        shutil.copy2(p, dst / p.name)
sd = load_file(str(src / "model.safetensors"))
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
err = max(float((half[k].float() - v.float()).abs().max()) for k, v in sd.items() if v.is_floating_point())
print(f"minilm-l6: {len(sd)} tensors -> fp16, max abs rounding error {err:.2e}")
PY
for d in sst2 mrpc rte cola xsum-sample alpaca-sample wikitext-2; do
    cp -r "$DATA_SRC/$d" "$TMP/data/$d"
done
chmod -R u+w "$TMP"
size=$(du -sm "$TMP" | cut -f1)
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "error: $TMP is ${size} MiB, over the ${LIMIT_MIB} MiB a device call carries" >&2
    exit 1
fi
rm -rf "$STAGE" && mv "$TMP" "$STAGE"
du -sh "$STAGE"/* "$STAGE"/data/*
echo "packed $STAGE (${size} MiB); carry [\".stage/g3\"]"
