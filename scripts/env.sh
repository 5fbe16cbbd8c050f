#!/usr/bin/env bash
# Create or reuse a virtualenv and install everything cmrcnn_ext needs into it. Sourced by
# scripts/demo.sh and scripts/test.sh; safe to run again (installed parts are skipped).
#
#   CMRCNN_D2      which Detectron2: "v0.6" (default; Python-only v0.6, patched by
#                  tools/install_detectron2.py) or "main" (official main with its compiled _C,
#                  from a wheel or GitHub: see tools/install_detectron2.py --official)
#   CMRCNN_VENV    where the virtualenv lives (default: .venv for v0.6, .venv-main for main)
#   CMRCNN_PYTHON  the Python that creates it (default: python3.11, else python3)
#
# Returns 3 when CMRCNN_D2=main and official Detectron2 main can be neither found nor built.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D2="${CMRCNN_D2:-v0.6}"
case "$D2" in
  v0.6) DEFAULT_VENV="$ROOT/.venv"; D2_ARGS=() ;;
  main) DEFAULT_VENV="$ROOT/.venv-main"; D2_ARGS=(--official) ;;
  *) echo "[env] CMRCNN_D2=$D2: use v0.6 or main" >&2; return 2 2>/dev/null || exit 2 ;;
esac
VENV="${CMRCNN_VENV:-$DEFAULT_VENV}"
PY_BOOT="${CMRCNN_PYTHON:-$(command -v python3.11 || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtualenv $VENV with $PY_BOOT (Detectron2 $D2)"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.cmrcnn_ext_installed"
WANT="$D2 $(cat "$ROOT/setup.py" "$ROOT/tools/install_detectron2.py" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import torch, detectron2, cmrcnn_ext" 2>/dev/null; then
  echo "[env] $VENV is up to date (Detectron2 $D2)"
else
  # setuptools: torch 2.14 needs >= 77; detectron2 imports pkg_resources, gone in 81.
  # uv installs the large wheels: it unpacks them in parallel into its cache (~/.cache/uv, or
  # UV_CACHE_DIR) and links them into the virtualenv, so the second virtualenv (the other
  # Detectron2) reuses the first one's torch. uv reads no pip configuration: wherever it fails
  # (no PyPI, say), pip, which does, installs the same requirements instead. Both compile the
  # bytecode at install: under PYTHONDONTWRITEBYTECODE=1 nothing else would, and every test
  # process would compile torch's modules again.
  "$PY" -m pip install -q "setuptools>=77,<81" wheel
  "$PY" -m pip install -q uv || echo "[env] uv is not installable here; pip installs everything"
  _cmrcnn_env_install() {
    if [ -x "$VENV/bin/uv" ] &&
      "$VENV/bin/uv" pip install -q --compile-bytecode --python "$PY" "$@"; then
      return 0
    fi
    echo "[env] installing $* with pip"
    "$PY" -m pip install -q "$@"
  }
  if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[env] installing torch 2.14.1 + torchvision 0.29.1"
    _cmrcnn_env_install torch==2.14.1 torchvision==0.29.1
  fi
  # Before Detectron2, which then finds most of its requirements installed.
  echo "[env] installing cmrcnn_ext (editable) and its test tools"
  _cmrcnn_env_install -e "$ROOT[test]"
  unset -f _cmrcnn_env_install
  rc=0
  CMRCNN_UV="$([ -x "$VENV/bin/uv" ] && echo "$VENV/bin/uv" || true)" \
    "$PY" "$ROOT/tools/install_detectron2.py" "${D2_ARGS[@]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "[env] Detectron2 $D2 could not be installed into $VENV (exit code $rc)" >&2
    return "$rc" 2>/dev/null || exit "$rc"
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
