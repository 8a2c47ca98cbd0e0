#!/usr/bin/env bash
# The GPU check of the optimizers (issue 12), sized for one device call of under 6 minutes:
#   1. the optimizer tests on CUDA (tests/client/optim/test_optim_cuda.py: the fused Triton kernels
#      against the float64 references and the foreach path, 10 steps of each optimizer under
#      torch.cuda.set_sync_debug_mode("error"), a CUDA-graph capture of a LAMB and a LANS step, and
#      torch.compile(fullgraph=True) of a LAMB step); GPU_CHECK_ALL=1 adds the rest of tests/client/optim;
#   2. benchmarks/optimizer_step.py on CUDA (BERT-base, ResNet-50, GPT-1.3B), with the README table.
#
# The device machine has torch, triton, pytest and numpy but not pydantic (scaling_rules needs it)
# and no network. Before the call, here:
#     bash scripts/gpu_check.sh --fetch-wheels       # pydantic & co. for Python 3.12 into .whl/
# then one device call:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=360)
# Logs and the benchmark's JSON land in $OUT (or ./gpu_check_out without one).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
    for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            typing-extensions==4.16.0; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec"
    done
    ls .whl
    exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# largebatch without installing it: a namespace package over the repository's folders
SHIM=$(mktemp -d)
mkdir -p "$SHIM/largebatch"
for d in client scaling_rules service; do ln -s "$PWD/$d" "$SHIM/largebatch/$d"; done
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
# the CUDA tests first (~2-3 min, most of it Triton and torch.compile compiling), then the benchmark
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/client/optim/test_optim_cuda.py --durations=10 -o addopts="" \
    2>&1 | tee "$OUT/tests.log" || status=1
timeout 110 "$PY" benchmarks/optimizer_step.py --device cuda --rounds 20 --readme --json "$OUT/optimizer_step.json" \
    2>&1 | tee "$OUT/benchmark.log" || status=1
# the CPU-side optimizer tests (CI runs them too) when asked: GPU_CHECK_ALL=1
if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/client/optim -m "not slow" -o addopts="" \
        2>&1 | tee "$OUT/tests_all.log" || status=1
fi
exit $status
