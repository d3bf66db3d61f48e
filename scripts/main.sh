#!/usr/bin/env bash
# The main job: set up, then train the toy example and write samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train_toy.py "$@"
