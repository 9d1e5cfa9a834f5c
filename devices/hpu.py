"""The Intel Gaudi (HPU) runtime. ``habana_frameworks`` is imported only here, and only on demand."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch

from .runtime import DeviceRuntime, MemoryStats

logger = logging.getLogger(__name__)

GAUDI_INSTALL_HINT = (
    "Intel Gaudi software not found: run inside an Intel Gaudi PyTorch image (vault.habana.ai/gaudi-docker/...) "
    "or install the Intel Gaudi software stack (habana-torch-plugin, see docs.habana.ai 'Installation Guide'), "
    "then `pip install paca-hal[gaudi]`. Or pass --device cpu / cuda."
)


def habana_installed() -> bool:
    """True when the Gaudi PyTorch bridge can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("habana_frameworks") is not None and (
            importlib.util.find_spec("habana_frameworks.torch") is not None
        )
    except (ImportError, ValueError):
        return False


def lazy_mode_enabled() -> bool:
    """Lazy mode as the bridge reads it from PT_HPU_LAZY_MODE (recent releases default to eager)."""
    return os.environ.get("PT_HPU_LAZY_MODE", "0") == "1"


class HpuRuntime(DeviceRuntime):
    type = "hpu"
    default_dtype = torch.bfloat16
    graph_modes = ("lazy", "eager", "compile", "hpu-graphs")

    def __init__(self) -> None:
        self._core = None

    def _torch_hpu(self):
        return getattr(torch, "hpu", None)

    def prepare(self) -> None:
        if self._core is None:
            self._core = importlib.import_module("habana_frameworks.torch.core")
            logger.info("Gaudi bridge loaded; PT_HPU_LAZY_MODE=%s", os.environ.get("PT_HPU_LAZY_MODE", "<unset>"))

    def is_available(self) -> bool:
        hpu = self._torch_hpu()
        if hpu is None:
            if not habana_installed():
                return False
            try:
                self.prepare()
            except Exception as error:  # a broken install must not crash device detection
                logger.debug("habana_frameworks import failed: %s", error)
                return False
            hpu = self._torch_hpu()
        try:
            return bool(hpu is not None and hpu.is_available())
        except Exception:
            return False

    def device_count(self) -> int:
        return self._torch_hpu().device_count() if self.is_available() else 0

    def unavailable_reason(self) -> str:
        if not habana_installed() and self._torch_hpu() is None:
            return GAUDI_INSTALL_HINT
        return "Intel Gaudi software is installed but no HPU is visible (check hl-smi and HABANA_VISIBLE_DEVICES)."

    def memory_stats(self, device: torch.device) -> MemoryStats:
        stats = self._torch_hpu().memory_stats(device)
        return MemoryStats(
            str(device), int(stats.get("InUse", 0)), int(stats.get("MaxInUse", 0)), stats.get("Limit"), "torch.hpu memory_stats"
        )

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        self._torch_hpu().reset_peak_memory_stats(device)

    def synchronize(self, device: torch.device) -> None:
        self._torch_hpu().synchronize()

    def step_boundary(self) -> None:
        """Flush the accumulated lazy graph (``htcore.mark_step``); harmless in eager mode."""
        if self._core is None:
            self.prepare()
        self._core.mark_step()
