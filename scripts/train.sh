#!/usr/bin/env bash
# The main job: set up, then fine-tune the default model on the default data (pass extra paca train flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m paca_core train "$@"
