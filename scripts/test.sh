#!/usr/bin/env bash
# The test suite: set up, then both tiers (GPU/HPU tests skip cleanly without the device):
#   1. the fast tier: plain `pytest` (pyproject.toml's addopts deselect the tests marked slow);
#   2. the slow tier: `pytest -m slow` (multi-process, default-model and bench-worker runs).
# Extra arguments go to both runs (e.g. `bash scripts/test.sh tests/test_plan.py -x`); a tier that the
# arguments leave without tests is not a failure. Arguments holding their own `-m EXPR` replace the tiers:
# one run with them. The slow tier runs even when the fast one failed; the exit status is the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}

for arg in "$@"; do
  if [[ "$arg" == -m || ( "$arg" == -m?* && "$arg" != --* ) ]]; then
    exec "$PY" -m pytest -q -ra "$@"
  fi
done

status=0
empty=0
run_tier() {  # run_tier NAME PYTEST-ARGS...
  local name=$1 rc=0
  shift
  echo "=== ${name} tier: pytest $(printf "%q " "$@")"
  "$PY" -m pytest -q -ra "$@" || rc=$?
  if [[ $rc -eq 5 ]]; then  # no tests collected: the arguments select none of this tier
    empty=$((empty + 1))
  elif [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
  fi
}
run_tier fast "$@"
run_tier slow -m slow "$@"
if [[ $status -eq 0 && $empty -eq 2 ]]; then
  status=5  # neither tier has a test the arguments select
fi
exit "$status"
