"""The CUDA runtime. Never initialises CUDA at import time."""
from __future__ import annotations

import logging

from ._torch import TorchDtype, torch

from .runtime import COMPILE, EAGER, DeviceRuntime, GraphMode, MemoryStats

logger = logging.getLogger(__name__)


#: CUDA graphs through torch.compile's ``reduce-overhead`` mode (inductor's CUDA-graph trees).
CUDA_GRAPHS = GraphMode("cuda-graphs", "torch.compile mode='reduce-overhead'", captured=True)


class CudaRuntime(DeviceRuntime):
    name = "cuda"
    auto_priority = 10
    default_dtype = TorchDtype("bfloat16")
    graph_modes = (EAGER, COMPILE, CUDA_GRAPHS)
    distributed_backend = "nccl"

    def capture_graphs(self, module: torch.nn.Module, training: bool, max_graphs: int | None = None) -> torch.nn.Module:
        """CUDA graphs as torch.compile records them (``mode="reduce-overhead"``), in place."""
        module.compile(backend="inductor", mode="reduce-overhead")
        return module

    def rank_device(self, device: torch.device, local_rank: int) -> torch.device:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device)

    def ddp_device_ids(self, device: torch.device) -> list[int] | None:
        return [device.index] if device.index is not None else None

    def describe(self, device: torch.device) -> dict:
        """Name, memory, compute capability, CUDA toolkit/driver, cuDNN and NCCL versions (``paca doctor``)."""
        info = super().describe(device)
        properties = torch.cuda.get_device_properties(device)
        info.update(total_memory_bytes=int(properties.total_memory), compute_capability=f"{properties.major}.{properties.minor}",
                    multiprocessors=int(properties.multi_processor_count), cuda_toolkit=torch.version.cuda,
                    cudnn=_read(torch.backends.cudnn.version), nccl=_read(lambda: ".".join(map(str, torch.cuda.nccl.version()))),
                    driver=_nvidia_smi_driver(), bf16_supported=_read(torch.cuda.is_bf16_supported))
        return info

    def reserved_peak_bytes(self, device: torch.device) -> int | None:
        return int(torch.cuda.max_memory_reserved(device))

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

    def free_bytes(self, device: torch.device) -> int | None:
        return int(torch.cuda.mem_get_info(device)[0])  # the driver's figure: other processes' use counts too

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def new_stream(self, device: torch.device | None = None) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device | None = None) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def stream_context(self, stream):
        return torch.cuda.stream(stream)

    def new_event(self, device: torch.device | None = None, enable_timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=enable_timing)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)

    def pin_memory_supported(self) -> bool:
        return self.is_available()

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.pin_memory_supported() else tensor

    def make_adamw(self, params, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) -> torch.optim.Optimizer:
        """torch's fused AdamW (one kernel for all parameters) when every parameter is a floating CUDA tensor."""
        params = list(params)
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        fused = bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)
        options = {"fused": True} if fused else {"foreach": True}
        logger.info("Optimizer: torch.optim.AdamW(%s)", ", ".join(f"{k}=True" for k in options))
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def _read(reader):
    """``reader()``, or None when this build or driver cannot answer (a report field, never an error)."""
    try:
        return reader()
    except Exception:  # noqa: BLE001 - any failure means "unknown" in a report
        return None


def _nvidia_smi_driver() -> str | None:
    """The driver version as ``nvidia-smi`` reports it (torch exposes only the CUDA version it was built with)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None
