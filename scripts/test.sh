#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, lints, runs every test (what CI runs).
#
#   scripts/test.sh            everything: set-up check, ruff, the whole suite, in one process
#   scripts/test.sh --fast     the inner loop, under a minute on two cores: ruff, then the unit-level
#                              tests (engine, optimizers, the service in-process on SQLite, the client
#                              against a mock transport) in two pytest-xdist workers; left out: the
#                              tests marked `slow` (uvicorn subprocesses, several processes,
#                              benchmarks, statistical tests that train for thousands of steps), those
#                              marked `postgres` (the same tests again on PostgreSQL), and the set-up
#                              step once .venv exists
#
# Further arguments go to pytest (e.g. scripts/test.sh --fast tests/service -x; `-n 0` runs --fast
# in one process).
# The full run stays in one process: its subprocess tests (DDP ranks under a watchdog, uvicorn
# servers, the liveness-under-load checks) each want both cores, and a second worker beside them
# turns a deadline into a coin toss. It fits CI's time several times over as it is.
# PostgreSQL must listen on 127.0.0.1:5432 (.ci/run starts it when it is down).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    # A .venv made before pytest-xdist joined the dev extra gets it from setup.sh, like a new one.
    .venv/bin/python -c "import xdist" 2>/dev/null || bash scripts/setup.sh
    .venv/bin/ruff check .
    # pytest rewrites the asserts of ~300 modules on every start (~9 s a worker) unless it may keep the
    # result as bytecode: keep it, under the temp directory rather than the checkout, even where the
    # environment says PYTHONDONTWRITEBYTECODE. The schemathesis plugin serves only tests --fast leaves out.
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/largebatch-pycache}"
    exec .venv/bin/python -m pytest -q -n 2 -m "not slow and not postgres" -p no:cacheprovider -p no:schemathesis "$@"
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
