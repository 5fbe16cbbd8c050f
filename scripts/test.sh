#!/usr/bin/env bash
# Set up (or reuse) the virtualenv, then run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k equivalence`. Slow tests: `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
echo "[test] ruff check (lint)"
ruff check .
exec python -m pytest tests "$@"
