#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, lints, runs every test.
# PostgreSQL must listen on 127.0.0.1:5432 (.ci/run starts it when it is down).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
