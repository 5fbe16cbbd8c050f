#!/usr/bin/env bash
# Set up (or reuse) the virtualenv, then run the CPU demo: synthetic data, training from scratch,
# COCO evaluation, plots and prediction pictures in output/demo. Extra arguments go to
# `cmrcnn-demo` (e.g. `--output DIR` or `SOLVER.MAX_ITER 100`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
exec cmrcnn-demo "$@"
