#!/usr/bin/env bash
# paca plan against real training steps on this machine's GPU or Gaudi, in under 8 minutes: every one-process
# configuration of docs/plan-published/rows.json at reduced depth (4 decoder layers), planned and measured
# (allocated, reserved, step time) into $OUT/results.json (default runs/validate-on-device).
#   scripts/validate_on_device.sh                      # the accelerator 'auto' finds, its profile from its name
#   scripts/validate_on_device.sh --device hpu --profile gaudi2 --only U1,A1,G1
#   scripts/validate_on_device.sh --device cpu --model smollm2-135m --layers 1 --seq-len 32 --batch-size 1 --dtype fp32
# Extra flags go to scripts/validate_on_device.py (--help; --overwrite replaces an earlier results.json).
# Configurations stop starting after 450 s; the whole run is cut at 470 s, and results.json keeps every
# configuration finished before that.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=TERM 470 "${PYTHON:-python3}" scripts/validate_on_device.py "$@"
