#!/usr/bin/env bash
# Create or reuse the project's virtualenv and install everything cmrcnn_ext needs into it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (installed parts are skipped).
#
#   CMRCNN_VENV   where the virtualenv lives (default: .venv in the repository)
#   CMRCNN_PYTHON the Python that creates it (default: python3.11, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CMRCNN_VENV:-$ROOT/.venv}"
PY_BOOT="${CMRCNN_PYTHON:-$(command -v python3.11 || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtualenv $VENV with $PY_BOOT"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.cmrcnn_ext_installed"
WANT="$(cat "$ROOT/setup.py" "$ROOT/tools/install_detectron2.py" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import torch, detectron2, cmrcnn_ext" 2>/dev/null; then
  echo "[env] $VENV is up to date"
else
  # setuptools: torch 2.14 needs >= 77; detectron2 v0.6 imports pkg_resources, gone in 81.
  "$PY" -m pip install -q "setuptools>=77,<81" wheel
  if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[env] installing torch 2.14.1 + torchvision 0.29.1 (about a minute)"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  # Official detectron2 already importable: used as is. Otherwise the v0.6 sdist, patched.
  "$PY" "$ROOT/tools/install_detectron2.py"
  echo "[env] installing cmrcnn_ext (editable) and its test tools"
  "$PY" -m pip install -q -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
