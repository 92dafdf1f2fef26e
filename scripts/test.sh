#!/usr/bin/env bash
# Set up (.venv), start a local PostgreSQL for the database tests, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DOOLY_TEST_PG_URL=$(bash scripts/postgres.sh | tail -1)
export DOOLY_TEST_PG_URL
.venv/bin/lint-imports --no-cache  # the layering contract in .importlinter: fails on a backward import
.venv/bin/python -m pytest -q "$@"
