"""backends: how primitives run on each device — one :class:`Backend` interface, implemented once in
portable PyTorch (:class:`TorchBackend`) and overridden per device only where a device runs faster code.

Depends on ``devices`` (never the reverse) and knows nothing about models or methods.
"""
from .base import Backend, PartialConnectionGrads, Tolerance
from .cuda import CudaBackend
from .hpu import HpuBackend
from .portable import TorchBackend
from .registry import BACKEND_CLASSES, get_backend, overridden_primitives, register_backend, unregister_backend

__all__ = [
    "BACKEND_CLASSES",
    "Backend",
    "CudaBackend",
    "HpuBackend",
    "PartialConnectionGrads",
    "Tolerance",
    "TorchBackend",
    "get_backend",
    "overridden_primitives",
    "register_backend",
    "unregister_backend",
]

# The built-in device backends; every other device type (cpu included) runs TorchBackend.
register_backend(CudaBackend)
register_backend(HpuBackend)
