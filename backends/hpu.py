"""Intel Gaudi (HPU) backend.

Its primitives are the portable ones, which already suit the Gaudi graph compiler: static shapes
(fixed indices per layer), no data-dependent ops, no host reads. They run on the device's MME/TPC
through the PyTorch bridge; nothing here imports ``habana_frameworks`` (devices/hpu.py does, lazily),
so the same kernels can be verified on CPU tensors where no Gaudi exists.
"""
from __future__ import annotations

import torch

from .base import Tolerance
from .portable import TorchBackend


class HpuBackend(TorchBackend):
    device_type = "hpu"
    name = "hpu"
    tolerances = {
        **TorchBackend.tolerances,
        # Gaudi's MME rounds bf16 products differently from oneDNN/cuBLAS; allow a little more.
        torch.bfloat16: Tolerance(3e-2, 3e-2),
    }
