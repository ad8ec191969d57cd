#!/usr/bin/env bash
# The GPU check: bash benchmarks/gpu_check.sh [--out runs/gpu_check] [--dry-run] [--teacher SPEC] [--teacher-shape DIR]
# Under 8 minutes on one H100/H200; writes gpu_check.json and gpu_check.md into --out (and into $OUT when set).
# What it runs and why: benchmarks/gpu_check.py. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
# This checkout's kdlm, whether or not it is installed.
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$root"
exec "$python" benchmarks/gpu_check.py "$@"
