#!/usr/bin/env bash
# Set up .venv, then run the main job: fine-tune a small Llama with LoRA, save the adapter, reload it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
exec .venv/bin/python examples/quickstart.py "$@"
