#!/usr/bin/env bash
# Sets up .venv from nothing: torch 2.13.0 (CPU) first so pip never resolves a CUDA build, then the
# project with every extra the tests use. Safe to re-run: each step is skipped when already done
# (the project step while pyproject.toml and setup.py are unchanged since it last ran; delete
# .venv/.largebatch-installed to force it). Says what it does, one line a step, and nothing when
# there is nothing to do: scripts/test.sh runs it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup.sh: $*"; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    say "installing torch==2.13.0 (CPU; about 200 MB: a few minutes on a first run)"
    .venv/bin/pip install --quiet torch==2.13.0
fi
# (dev pulls in triton: beside the CPU torch it runs the fused optimizer kernels under its interpreter)
stamp=.venv/.largebatch-installed
wanted=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    say "installing largebatch (editable) with its dev, torch, hf and lightning extras (a few minutes on a first run, under a minute after)"
    .venv/bin/pip install --quiet -e '.[dev,torch,hf,lightning]'
    echo "$wanted" > "$stamp"
    say "done: run .venv/bin/largebatch, or \`source .venv/bin/activate\` first to type largebatch alone"
fi
