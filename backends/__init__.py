"""backends: how primitives run on each device — one :class:`Backend` interface, implemented once in
portable PyTorch (:class:`TorchBackend`) and overridden per device only where a device runs faster code.
A device may also have opt-in alternative backends, picked by name (``$PACA_BACKEND``, :func:`select_backend`).

Depends on ``devices`` (never the reverse) and knows nothing about models or methods.
"""
from .base import Backend, PartialConnectionGrads, Tolerance
from .cuda import CudaBackend
from .hpu import HpuBackend
from .portable import TorchBackend
from .registry import (
    BACKEND_CLASSES,
    ENV_VAR,
    backend_names,
    get_backend,
    overridden_primitives,
    register_backend,
    registered_backends,
    select_backend,
    unregister_backend,
)

__all__ = [
    "BACKEND_CLASSES",
    "Backend",
    "CudaBackend",
    "ENV_VAR",
    "HpuBackend",
    "PartialConnectionGrads",
    "Tolerance",
    "TorchBackend",
    "backend_names",
    "get_backend",
    "overridden_primitives",
    "register_backend",
    "registered_backends",
    "select_backend",
    "unregister_backend",
]

# The built-in device backends; every other device type (cpu included) runs TorchBackend.
register_backend(CudaBackend)
register_backend(HpuBackend)
