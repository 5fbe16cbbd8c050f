#!/usr/bin/env bash
# CUDA checks and GPU benchmarks, for a machine with an NVIDIA GPU and a Python that already has
# torch + torchvision with CUDA. Everything else cmrcnn_ext needs must be importable (scripts/env.sh
# installs it; on an offline GPU machine put the pure-Python packages on PYTHONPATH).
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
#
# Writes to OUTPUT_DIR (default output/gpu): the CUDA tests' log (tests/test_cuda.py) and the
# inference/training benchmark tables (benchmarks/bench_inference.py --device cuda) for the R50-FPN
# config at 800 x 1067 (training batch 1 and 2) and for the demo config (with its scaling tables).
set -uo pipefail
OUT_DIR="${1:-output/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, torchvision, detectron2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'detectron2', detectron2.__version__, torch.cuda.get_device_name())" | tee -a "$OUT_DIR/gpu.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT_DIR/test_cuda.txt"
timeout 250 "$PY" benchmarks/bench_inference.py --device cuda --iters 20 --warmup 3 --train-iters 5 \
  --batch-sizes 1,2 2>&1 | tee "$OUT_DIR/bench_r50_cuda.txt"
timeout 150 "$PY" benchmarks/bench_inference.py --device cuda --config demo --iters 30 --warmup 5 \
  --train-iters 10 --scaling 2>&1 | tee "$OUT_DIR/bench_demo_cuda.txt"
