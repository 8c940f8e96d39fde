#!/usr/bin/env bash
# Create .venv (if missing) and install lora-engine with its test extra into it.
# torch is pinned to the CPU build 2.13.0 only when the venv has no torch yet: an unpinned torch would pull a
# multi-GB CUDA build, and an installed torch (CPU or CUDA) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[test]"
