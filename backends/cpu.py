"""CPU backend: the portable primitives (oneDNN already accumulates bf16 GEMMs in float32)."""
from __future__ import annotations

from .portable import TorchBackend


class CpuBackend(TorchBackend):
    device_type = "cpu"
    name = "cpu"
