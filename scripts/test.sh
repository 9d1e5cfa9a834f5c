#!/usr/bin/env bash
# The test suite: set up, then run every test (GPU/HPU tests skip cleanly without the device).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -ra "$@"
