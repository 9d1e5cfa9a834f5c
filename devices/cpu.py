"""The CPU runtime: always available; memory is the process's resident set size; bf16 by default only where the CPU
multiplies bf16 natively."""
from __future__ import annotations

import os
import resource

from ._torch import torch

from .cpu_features import cpu_dtype_choice
from .runtime import COMPILE, EAGER, DeviceRuntime, DtypeChoice, MemoryStats


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _meminfo_available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo: free memory plus caches the kernel can drop (Linux >= 3.14)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class CpuRuntime(DeviceRuntime):
    name = "cpu"
    auto_priority = 0  # always there: the last resort of ``auto``
    indexed = False
    graph_modes = (EAGER, COMPILE)

    shares_host_memory = True

    def preferred_dtype(self) -> DtypeChoice:
        """bf16 where the CPU multiplies bf16 natively (AVX512-BF16 / AMX-BF16), fp32 elsewhere: emulated bf16 is
        slower than fp32. Decided once per process from what torch reports (``devices/cpu_features.py``)."""
        return cpu_dtype_choice()

    def device_name(self, device: torch.device) -> str:
        import platform

        return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"

    def describe(self, device: torch.device) -> dict:
        """Name, threads, memory and the instructions ``--dtype auto`` decides from (``paca doctor``)."""
        from .cpu_features import query_bf16_support

        info = super().describe(device)
        info.update(threads=torch.get_num_threads(), total_memory_bytes=self.memory_stats(device).total_bytes,
                    bf16=query_bf16_support().describe())
        return info

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_stats(self, device: torch.device) -> MemoryStats:
        current = _read_status_kib("VmRSS")
        peak = _read_status_kib("VmHWM")
        source = "/proc/self/status VmRSS/VmHWM"
        if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = peak if os.uname().sysname == "Darwin" else peak * 1024
            current = current * 1024 if current is not None else peak
            source = "getrusage ru_maxrss"
        else:
            current, peak = current * 1024, peak * 1024
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        return MemoryStats(str(device), current, peak, total, source)

    def free_bytes(self, device: torch.device) -> int | None:
        available = _meminfo_available_bytes()
        if available is None and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # free pages only: an underestimate
        return available

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        # Linux resets the VmHWM high-water mark when "5" is written to clear_refs.
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
        except OSError:
            pass  # peak then covers the whole process lifetime; MemoryStats.source says which
