#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, lints, runs every test (what CI runs).
#
#   scripts/test.sh            everything: set-up check, ruff, the whole suite
#   scripts/test.sh --fast     the inner loop, under a minute: ruff, then the unit-level tests
#                              (engine, optimizers, the service in-process on SQLite, the client
#                              against a mock transport); left out: the tests marked `slow`
#                              (uvicorn subprocesses, several processes, benchmarks), those marked
#                              `postgres` (the same tests again on PostgreSQL), and the set-up
#                              step once .venv exists
#
# Further arguments go to pytest (e.g. scripts/test.sh --fast tests/service -x).
# PostgreSQL must listen on 127.0.0.1:5432 (.ci/run starts it when it is down).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    [[ -x .venv/bin/python ]] || bash scripts/setup.sh
    .venv/bin/ruff check .
    exec .venv/bin/python -m pytest -q -m "not slow and not postgres" -p no:cacheprovider "$@"
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
