#!/usr/bin/env bash
# The test suite: set up, run the tests, then once more with runtime type checking on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
TYPECHECK=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
