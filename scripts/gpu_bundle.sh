#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs beyond torch + torchvision into one folder, for an
# offline GPU machine whose Python (another version than this machine's) already has torch,
# torchvision, numpy, opencv, pyyaml, tabulate, portalocker and matplotlib:
#
#   bash scripts/gpu_bundle.sh [DEST] [PYTHON_VERSION]     # default .gpu, 3.12
#
# DEST/site        Detectron2 main as Python source (../shared/detectron2's archive, or
#                  $CMRCNN_D2_SRC), with its model-zoo configs, and the pure-Python packages
#                  Detectron2 imports, copied from this repository's .venv (scripts/env.sh).
#                  Detectron2's compiled ops (_C) are left out: the cascade uses torchvision's
#                  ROIAlign and NMS; only deformable convolutions, rotated boxes and Detectron2's
#                  own COCO evaluator need them, and none of the GPU checks runs those.
# DEST/whl         pycocotools and faster-coco-eval wheels for PYTHON_VERSION (compiled).
# DEST/setuptools  setuptools < 81, for Detectron2's `import pkg_resources` where the GPU
#                  machine's setuptools no longer has it.
#
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/DEST/site:$PWD
#   python3 -c "import pkg_resources" || export PYTHONPATH=$PYTHONPATH:$PWD/DEST/setuptools
#   bash scripts/gpu_check.sh
set -euo pipefail
DEST="${1:-.gpu}"
PYVER="${2:-3.12}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${CMRCNN_D2_SRC:-$ROOT/../shared/detectron2/main-02b5c4e/detectron2-main-02b5c4e-src.tar.gz}"
SP="$("$ROOT/.venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
rm -rf "$DEST" && mkdir -p "$DEST/site" "$DEST/whl" "$DEST/setuptools"
for pkg in antlr4 fvcore hydra iopath omegaconf yacs termcolor; do
  cp -r "$SP/$pkg" "$DEST/site/"
done
cp -r "$SP/setuptools" "$SP/pkg_resources" "$SP/_distutils_hack" "$DEST/setuptools/"
tmp="$(mktemp -d)"
tar -xzf "$SRC" -C "$tmp"
cp -r "$tmp/detectron2" "$DEST/site/"
# setup.py copies the configs into the package; a source tree links them
rm -rf "$DEST/site/detectron2/model_zoo/configs"
cp -r "$tmp/configs" "$DEST/site/detectron2/model_zoo/configs"
rm -rf "$tmp"
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
"$ROOT/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST/whl" \
  "pycocotools==$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pycocotools"))')" \
  "faster-coco-eval==$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("faster-coco-eval"))')"
du -sh "$DEST"
