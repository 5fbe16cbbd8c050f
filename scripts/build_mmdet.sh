#!/usr/bin/env bash
# Build MMDetection 3.x with mmcv's compiled CPU ops for `benchmarks/bench_peers.py --mmdet`,
# into a folder beside the project's virtualenv (nothing is installed into it):
#
#   bash scripts/build_mmdet.sh            # -> .mmdet/site (about 6 minutes on 2 cores)
#   PYTHONPATH=.mmdet/site .venv/bin/python benchmarks/bench_peers.py --mmdet --config r50
#
# Why these versions and the patch (docs/performance.md, "MMDetection on the CPU"): mmdet 3.3.0,
# the newest on PyPI, accepts only mmcv >= 2.0.0rc4 and < 2.2.0, so mmcv 2.1.0; PyPI has no mmcv
# wheel for this torch, and mmcv's sdist compiles with -std=c++17 where torch >= 2.10's headers
# need C++20, so setup.py's flag is changed to -std=c++20. CFLAGS are Python's default optimisation (-O3)
# without debug information (-g makes the 77 units several times slower to compile).
#
#   CMRCNN_VENV   the virtualenv whose Python and torch build mmcv (default: .venv)
#   MMDET_DIR     where the build and the packages go (default: .mmdet)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CMRCNN_VENV:-$ROOT/.venv}/bin/python"
DIR="${MMDET_DIR:-$ROOT/.mmdet}"
[ -x "$PY" ] || { echo "[mmdet] no $PY: run 'source scripts/env.sh' first" >&2; exit 2; }
mkdir -p "$DIR"
cd "$DIR"

"$PY" -m pip install -q --upgrade --target tools ninja==1.13.2
export PATH="$DIR/tools/bin:$PATH" PYTHONPATH="$DIR/tools"
if ! ls wheels/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d .
  rm -rf mmcv-2.1.0 && tar xzf mmcv-2.1.0.tar.gz
  sed -i "s/'-std=c++17'/'-std=c++20'/g" mmcv-2.1.0/setup.py
  grep -q "'-std=c++20'" mmcv-2.1.0/setup.py || { echo "[mmdet] setup.py: no C++ flag to patch" >&2; exit 1; }
  echo "[mmdet] compiling mmcv 2.1.0's ops with C++20 ($(nproc) cores)"
  (cd mmcv-2.1.0 && CFLAGS="-Wsign-compare -DNDEBUG -g0 -fwrapv -O3 -Wall" MMCV_WITH_OPS=1 \
    FORCE_CUDA=0 MAX_JOBS="$(nproc)" "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w ../wheels)
fi
# The packages that mmcv, mmengine and mmdet import and the project's virtualenv lacks; --no-deps
# keeps the virtualenv's torch and numpy the ones in use.
"$PY" -m pip install -q --upgrade --target site --no-deps wheels/mmcv-2.1.0-*.whl \
  mmengine==0.10.7 mmdet==3.3.0 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 rich==15.0.0 \
  markdown-it-py==4.3.0 mdurl==0.1.2 terminaltables==3.1.10 shapely==2.2.0 scipy==1.17.1 six==1.17.0
PYTHONPATH="$DIR/site" "$PY" -c "import mmcv.ops, mmdet; print('[mmdet] mmdet', mmdet.__version__, 'with mmcv', mmcv.__version__, 'and its ops')"
echo "[mmdet] use: PYTHONPATH=$DIR/site $PY benchmarks/bench_peers.py --mmdet ..."
