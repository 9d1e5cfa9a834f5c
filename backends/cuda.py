"""CUDA backend: portable primitives plus what cuBLAS does faster.

The delta gradient uses cuBLAS's float32-output GEMM for half-precision inputs when this torch
build has it (``torch.mm(..., out_dtype=torch.float32)``), which avoids the upcast copy.
"""
from __future__ import annotations

import torch

from .portable import TorchBackend, matmul_t_fp32


class CudaBackend(TorchBackend):
    device_type = "cuda"
    name = "cuda"

    def __init__(self) -> None:
        super().__init__()
        self._mm_out_dtype_works: bool | None = None

    def _delta_grad(self, grad_2d: torch.Tensor, x_selected_2d: torch.Tensor) -> torch.Tensor:
        half = grad_2d.dtype in (torch.float16, torch.bfloat16) and grad_2d.dtype == x_selected_2d.dtype
        if half and grad_2d.is_cuda and self._mm_out_dtype_works is not False:
            try:
                result = torch.mm(grad_2d.t(), x_selected_2d, out_dtype=torch.float32)
                self._mm_out_dtype_works = True
                return result
            except (TypeError, RuntimeError, NotImplementedError):
                self._mm_out_dtype_works = False  # older torch: fall back to the chunked upcast
        return matmul_t_fp32(grad_2d, x_selected_2d)
