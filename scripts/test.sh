#!/usr/bin/env bash
# The test suite, run against both Detectron2 versions, each in its own virtualenv (created on
# first use by scripts/env.sh):
#   leg (a) Detectron2 v0.6, Python-only, patched by tools/install_detectron2.py   (.venv)
#   leg (b) official Detectron2 main with its compiled _C                          (.venv-main)
# Leg (b) installs main from a wheel (../shared/detectron2/ or CMRCNN_D2_WHEEL) or from GitHub;
# where neither is available it is skipped, and the summary says so.
#
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k equivalence`; slow tests:
# `bash scripts/test.sh -m slow`. CMRCNN_LEGS="v0.6" (or "main") runs one leg. Tests marked
# one_leg (multi-process tests of code that does not depend on Detectron2's version) run in the
# main leg only; `-m one_leg` on the command line runs them in both.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LEGS="${CMRCNN_LEGS:-v0.6 main}"
status=0
summary=()
first=1
for leg in $LEGS; do
  echo "================ [test] Detectron2 $leg ================"
  rc=0
  (
    set -e
    export CMRCNN_D2="$leg"
    source scripts/env.sh || { rc=$?; [ "$rc" -eq 3 ] && exit 97; exit "$rc"; }
    python -c "import detectron2, torch; print('[test] detectron2', detectron2.__version__, 'at', detectron2.__file__, '| torch', torch.__version__)"
    if [ "$first" = 1 ]; then
      echo "[test] ruff check (lint) and ruff format --check (formatting)"
      ruff check . || exit 1
      ruff format --check . || exit 1
    fi
    # one_leg tests (Detectron2-version-independent process tests) run in the main leg only
    marks=()
    [ "$leg" = main ] || marks=(-m "not slow and not one_leg")
    python -m pytest tests "${marks[@]}" "$@"
  ) || rc=$?
  first=0
  if [ "$rc" -eq 0 ]; then
    summary+=("Detectron2 $leg: passed")
  elif [ "$rc" -eq 97 ]; then
    summary+=("Detectron2 $leg: SKIPPED - official Detectron2 main is not available here (no wheel, no GitHub); see the [env] message above")
  else
    summary+=("Detectron2 $leg: FAILED (exit code $rc)")
    status=1
  fi
done
echo "================ [test] summary ================"
printf '  %s\n' "${summary[@]}"
exit "$status"
