#!/usr/bin/env bash
# Sets up .venv from nothing: torch 2.13.0 (CPU) first so pip never resolves a CUDA build, then the
# project with every extra the tests use. Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
# (dev pulls in triton: beside the CPU torch it runs the fused optimizer kernels under its interpreter)
.venv/bin/pip install --quiet -e '.[dev,torch,hf,lightning]'
