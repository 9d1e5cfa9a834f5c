"""backends: how primitives run on each device — one :class:`Backend` interface, one file per device.

Depends on ``devices`` (never the reverse) and knows nothing about models or methods.
"""
from .base import Backend, PartialConnectionGrads, Tolerance, Transfer
from .cpu import CpuBackend
from .cuda import CudaBackend
from .hpu import HpuBackend
from .portable import TorchBackend, matmul_t_fp32
from .registry import BACKEND_CLASSES, get_backend

__all__ = [
    "BACKEND_CLASSES",
    "Backend",
    "CpuBackend",
    "CudaBackend",
    "HpuBackend",
    "PartialConnectionGrads",
    "Tolerance",
    "TorchBackend",
    "Transfer",
    "get_backend",
    "matmul_t_fp32",
]
