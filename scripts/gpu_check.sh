#!/usr/bin/env bash
# CUDA checks and GPU benchmarks, for a machine with an NVIDIA GPU and a Python that already has
# torch + torchvision with CUDA. Everything else cmrcnn_ext needs must be importable (scripts/env.sh
# installs it; on an offline GPU machine put the pure-Python packages on PYTHONPATH).
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
#
# Writes to OUTPUT_DIR (default output/gpu), one log per step, most important first:
#   gpu.txt              GPU name, driver, memory; torch / torchvision / detectron2 versions;
#                        the embedded shapes data's generation
#   train_r50_amp.txt    benchmarks/bench_train.py --device cuda --d2, R50-FPN 1x at 800 px,
#                        batch 2, SOLVER.AMP.ENABLED (float16): step time against Detectron2's
#                        built-in cascade, FLOPs, GFLOP/s against the GPU's measured peak, memory
#   infer_r50.txt        benchmarks/bench_inference.py --device cuda: R50-FPN inference latency,
#                        FLOPs and GFLOP/s against the GPU's float32 peak
#   infer_demo.txt       the same on the demo config
#   test_cuda.txt        tests/test_cuda.py (GPU results equal the CPU's and Detectron2's)
#   train_demo_amp.txt   bench_train.py --device cuda --d2 on the demo config
#   peers_r50.txt        benchmarks/bench_peers.py --device cuda: torchvision's Mask R-CNN v2,
#                        Detectron2's cascade and ours, inference and float32 training, batch 2
#   train_r50_amp_b8.txt bench_train.py as the first, batch 8
# GPU_CHECK_SECONDS (default: no limit) bounds the whole run: a step starts only with time left
# and is stopped at the deadline, so that a leased machine returns every finished log.
set -uo pipefail
OUT_DIR="${1:-output/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-1000000}))

# step NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and the time
# left, its output to the terminal and OUTPUT_DIR/NAME.txt
step() {
  local name="$1" limit="$2" left=$((DEADLINE - SECONDS))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s left" | tee "$OUT_DIR/$name.txt"
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^ +(torch|return|import) " \
    | tee "$OUT_DIR/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $SECONDS s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, torchvision, detectron2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'detectron2', detectron2.__version__, detectron2.__file__, torch.cuda.get_device_name())" | tee -a "$OUT_DIR/gpu.txt"
# the embedded shapes data (made on first use; made here once so the workers do not race)
timeout 120 "$PY" tools/generate_shapes.py 2>&1 | tee -a "$OUT_DIR/gpu.txt"
R50_AMP=(SOLVER.AMP.ENABLED True DATALOADER.NUM_WORKERS 4)
step train_r50_amp 150 "$PY" benchmarks/bench_train.py --config r50 --device cuda --d2 \
  --rounds 4 --steps 5 --warmup 3 "${R50_AMP[@]}"
step infer_r50 100 "$PY" benchmarks/bench_inference.py --device cuda --iters 20 --warmup 3 \
  --batch-sizes none --no-export
step infer_demo 60 "$PY" benchmarks/bench_inference.py --device cuda --config demo --iters 30 \
  --warmup 5 --batch-sizes none --no-export
step test_cuda 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
step train_demo_amp 90 "$PY" benchmarks/bench_train.py --config demo --device cuda --d2 \
  --rounds 4 --steps 10 --warmup 5 DATALOADER.NUM_WORKERS 4
step peers_r50 120 "$PY" benchmarks/bench_peers.py --config r50 --device cuda --iters 10 \
  --train-iters 5 --batch 2
step train_r50_amp_b8 120 "$PY" benchmarks/bench_train.py --config r50 --device cuda --d2 \
  --rounds 3 --steps 4 --warmup 3 "${R50_AMP[@]}" SOLVER.IMS_PER_BATCH 8
