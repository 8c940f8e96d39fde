#!/usr/bin/env bash
# Set up .venv, then run the test suite. Extra arguments go to pytest.
# pytest runs through its entry point, never `python -m pytest`: that would put the repo root on sys.path and
# make our `kernels/` folder importable as a top-level `kernels`, which transformers and bitsandbytes probe.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
exec .venv/bin/pytest tests "$@"
