"""CUDA backend: the portable primitives plus what cuBLAS does faster.

:meth:`CudaBackend.skinny_grad_fp32` multiplies half-precision operands with cuBLAS's float32-output
GEMM (``torch.mm(..., out_dtype=torch.float32)``) instead of upcasting them in chunks: no float32
copies of the operands, one kernel. Where that GEMM does not exist (an older torch, a device type
without the kernel, e.g. CPU tensors) it falls back to the portable version, decided once per device type.
"""
from __future__ import annotations

import torch

from .portable import TorchBackend

_HALF = (torch.float16, torch.bfloat16)


class CudaBackend(TorchBackend):
    device_type = "cuda"
    name = "cuda"

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__(device_type)
        #: device type -> whether torch.mm(..., out_dtype=float32) runs there (learnt on first use).
        self._fp32_output_gemm: dict[str, bool] = {}

    def skinny_grad_fp32(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        kind = a.device.type
        if a.dtype in _HALF and a.dtype == b.dtype and self._fp32_output_gemm.get(kind, True):
            try:
                result = torch.mm(a.t(), b, out_dtype=torch.float32)
            except torch.cuda.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):
                self._fp32_output_gemm[kind] = False  # no such kernel here: the portable chunked upcast
            else:
                self._fp32_output_gemm[kind] = True
                return result
        return super().skinny_grad_fp32(a, b)
