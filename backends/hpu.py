"""Intel Gaudi (HPU) backend: the portable primitives, with the tolerances Gaudi's arithmetic needs.

The portable primitives already suit the Gaudi graph compiler: static shapes (fixed indices per
layer), no data-dependent ops, no host reads. They run on the device's MME/TPC through the PyTorch
bridge, so no primitive is overridden (the conformance suite therefore runs this backend only on a
real HPU). This file exists for the ``tolerances`` the conformance suite holds a Gaudi to; nothing
here imports ``habana_frameworks`` (devices/hpu.py does, lazily).
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
