#!/usr/bin/env bash
# The main job: set up, then train the MNIST example (text <-> image) and write samples + eval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train_mnist.py "$@"
