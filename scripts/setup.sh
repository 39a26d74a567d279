#!/usr/bin/env bash
# Install PrunePath and everything its tests need into the current Python (idempotent).
# torch is pinned first: on a CPU machine an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${PRUNEPATH_TORCH:-torch==2.13.0}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PY" -c "import prunepath, torch; print(f'prunepath {prunepath.__version__} ready (torch {torch.__version__})')"
