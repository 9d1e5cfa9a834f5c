"""The CUDA runtime. Never initialises CUDA at import time."""
from __future__ import annotations

import torch

from .runtime import DeviceRuntime, MemoryStats


class CudaRuntime(DeviceRuntime):
    type = "cuda"
    default_dtype = torch.bfloat16
    graph_modes = ("eager", "compile", "cuda-graphs")

    def is_available(self) -> bool:
        try:
            return torch.cuda.is_available()
        except Exception:  # broken driver installs raise instead of returning False
            return False

    def device_count(self) -> int:
        return torch.cuda.device_count() if self.is_available() else 0

    def unavailable_reason(self) -> str:
        if torch.version.cuda is None:
            return (
                f"This PyTorch build ({torch.__version__}) has no CUDA support. Install a CUDA build of "
                "torch, or pass --device cpu."
            )
        return "PyTorch was built with CUDA but no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or pass --device cpu."

    def memory_stats(self, device: torch.device) -> MemoryStats:
        free, total = torch.cuda.mem_get_info(device)
        return MemoryStats(
            str(device),
            torch.cuda.memory_allocated(device),
            torch.cuda.max_memory_allocated(device),
            total,
            "torch.cuda allocator",
        )

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
