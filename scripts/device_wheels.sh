#!/usr/bin/env bash
# Download, on a machine with network, the wheels a lent GPU machine lacks, for its Python (3.12, manylinux x86-64),
# into device-wheels/ (ignored by git; it travels with the working tree, 64 MiB in all, so keep it under ~60 MiB).
# scripts/prove_on_device.sh installs them there into a temporary --target folder, offline; torch is never among them.
#   bash scripts/device_wheels.sh                 # into device-wheels/
#   PACA_WHEELS=/tmp/w bash scripts/device_wheels.sh
# What and why:
#   bitsandbytes                 QPaCA and PEFT QLoRA (the machine has none)
#   peft>=0.22                   PEFT PaCA (peft-paca); the machine's peft may be older
#   deepspeed (built, no ops)    ZeRO tests and `paca train --deepspeed` (an sdist: built here with DS_BUILD_OPS=0)
#   hjson ninja py-cpuinfo msgpack einops pydantic (+ its core, annotated-types, typing-inspection)   DeepSpeed's needs
#   pytest pluggy iniconfig      the accelerator test tier (`paca doctor` runs pytest -m accelerator)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${PACA_WHEELS:-device-wheels}
PY=${PYTHON:-python3}
LIMIT_MIB=${PACA_WHEELS_LIMIT_MIB:-60}
TARGET=(--python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_28_x86_64 --implementation cp --only-binary=:all:)
# This machine's pip constraints pin versions for its own Python; they do not apply to another machine's wheels.
export PIP_CONSTRAINT=""
started=$(date +%s)
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Binary wheels for the device's Python, without their dependencies (those it has: torch, numpy, transformers...).
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" --dest "$DEST" \
  bitsandbytes "peft>=0.22" hjson ninja py-cpuinfo msgpack einops pydantic pydantic-core annotated-types typing-inspection \
  pytest pluggy iniconfig

# DeepSpeed ships only an sdist: build a pure-Python wheel with no ops compiled (they are JIT-built if ever used).
"$PY" -m pip download --quiet --no-deps --no-binary=:all: --no-build-isolation --dest "$tmp" deepspeed 2>/dev/null \
  || "$PY" -m pip download --quiet --no-deps --no-binary=deepspeed --dest "$tmp" deepspeed
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" "$tmp"/deepspeed-*.tar.gz

echo "device wheels in $DEST ($(( $(date +%s) - started )) s):"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
printf "  %8.1f MiB  total\n" "$(echo "$total / 1048576" | bc -l)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "device_wheels: $DEST holds more than ${LIMIT_MIB} MiB: it will not travel with the working tree (64 MiB in all)" >&2
  exit 1
fi
