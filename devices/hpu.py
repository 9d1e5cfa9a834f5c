"""The Intel Gaudi (HPU) runtime. ``habana_frameworks`` is imported only here, and only on demand: when
an HPU is resolved, or when ``auto`` probes a machine that has a Gaudi device node."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os

from ._torch import TorchDtype, torch

from .runtime import COMPILE, EAGER, DeviceRuntime, DeviceUnavailableError, GraphMode, MemoryStats

logger = logging.getLogger(__name__)

GAUDI_INSTALL_HINT = (
    "Intel Gaudi software not found: run inside an Intel Gaudi PyTorch image (vault.habana.ai/gaudi-docker/...) "
    "or install the Intel Gaudi software stack (habana-torch-plugin, see docs.habana.ai 'Installation Guide'), "
    "then `pip install paca-hal[gaudi]`. Or pass --device cpu / cuda."
)


def habana_installed() -> bool:
    """True when the Gaudi PyTorch bridge can be imported (checked without importing the bridge; finding
    ``habana_frameworks.torch`` runs the small top-level ``habana_frameworks/__init__``)."""
    try:
        return importlib.util.find_spec("habana_frameworks") is not None and (
            importlib.util.find_spec("habana_frameworks.torch") is not None
        )
    except Exception as error:  # a broken install must not crash device detection
        logger.debug("habana_frameworks lookup failed: %s", error)
        return False


#: Character devices the habanalabs driver creates per Gaudi: ``/dev/accel/accelN`` (the kernel's accel
#: subsystem, Linux >= 6.3 and current Intel Gaudi drivers) or ``/dev/hlN`` (older drivers).
GAUDI_DEVICE_NODES = ("/dev/accel/accel[0-9]*", "/dev/hl[0-9]*")


def gaudi_device_possible() -> bool:
    """False only when this is Linux and no Gaudi device node exists, so no HPU can be visible.

    Lets ``auto`` skip the bridge import (seconds, and log noise) on machines that have the Gaudi software
    but no card, e.g. a Gaudi image run on a CPU host. Elsewhere (no ``/dev``) it cannot tell: True.
    """
    if not os.path.isdir("/dev"):
        return True
    return any(glob.glob(pattern) for pattern in GAUDI_DEVICE_NODES)


def lazy_mode_enabled() -> bool:
    """Lazy mode as the bridge reads it from PT_HPU_LAZY_MODE (recent releases default to eager)."""
    return os.environ.get("PT_HPU_LAZY_MODE", "0") == "1"


LAZY = GraphMode("lazy", "graphs built lazily and cut at step boundaries", needs_lazy=True)
#: Captured graphs hold gradient tensors by address, so gradients are zeroed in place, never freed.
HPU_GRAPHS = GraphMode("hpu-graphs", "captured HPU graphs", captured=True, needs_lazy=True, keeps_grad_buffers=True)


class HpuRuntime(DeviceRuntime):
    name = "hpu"
    auto_priority = 20
    default_dtype = TorchDtype("bfloat16")
    graph_modes = (LAZY, EAGER, COMPILE, HPU_GRAPHS)
    compile_backend = "hpu_backend"  # registered by the Gaudi bridge
    distributed_backend = "hccl"

    def lazy_mode(self) -> bool:
        """The bridge fixes lazy versus eager once, when it loads, from ``PT_HPU_LAZY_MODE``."""
        return lazy_mode_enabled()

    def lazy_mode_requirement(self, enabled: bool) -> str:
        return (
            f"PT_HPU_LAZY_MODE={int(enabled)} set before Python starts "
            f"(it is {os.environ.get('PT_HPU_LAZY_MODE', 'unset')})"
        )

    def rank_device(self, device: torch.device, local_rank: int) -> torch.device:
        # Each process owns one card (the hccl import maps LOCAL_RANK to it): always plain "hpu".
        return torch.device("hpu")

    def prepare_distributed(self) -> None:
        # Registers the "hccl" backend; must run before the first HPU tensor and init_process_group.
        importlib.import_module("habana_frameworks.torch.distributed.hccl")

    def __init__(self) -> None:
        self._core = None
        self._clip_norms: dict[float, object] = {}

    def _torch_hpu(self):
        return getattr(torch, "hpu", None)

    def prepare(self) -> None:
        if self._core is None:
            self._core = importlib.import_module("habana_frameworks.torch.core")
            logger.info("Gaudi bridge loaded; PT_HPU_LAZY_MODE=%s", os.environ.get("PT_HPU_LAZY_MODE", "<unset>"))

    def is_available(self) -> bool:
        hpu = self._torch_hpu()
        if hpu is None:
            # The device nodes first: without them no HPU can be visible, and nothing is imported.
            if not gaudi_device_possible() or not habana_installed():
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
        if self._torch_hpu() is None:
            # The top-level lookup imports nothing; habana_installed() would run habana_frameworks/__init__.
            if importlib.util.find_spec("habana_frameworks") is None:
                return GAUDI_INSTALL_HINT
            if not gaudi_device_possible():
                return (
                    "Intel Gaudi software is installed but this machine has no Gaudi device node "
                    f"({' or '.join(GAUDI_DEVICE_NODES)}): check the habanalabs driver (hl-smi), or pass the devices "
                    "into the container. Or pass --device cpu / cuda."
                )
            if not habana_installed():
                return GAUDI_INSTALL_HINT
        return "Intel Gaudi software is installed but no HPU is visible (check hl-smi and HABANA_VISIBLE_DEVICES)."

    def memory_stats(self, device: torch.device) -> MemoryStats:
        stats = self._torch_hpu().memory_stats(device)
        return MemoryStats(
            str(device), int(stats.get("InUse", 0)), int(stats.get("MaxInUse", 0)), stats.get("Limit"), "torch.hpu memory_stats"
        )

    def describe(self, device: torch.device) -> dict:
        """Name, generation, memory limit, the Gaudi software stack's versions (``habana-torch-plugin``,
        ``habana_frameworks``), the driver (``hl-smi``) and the lazy-mode setting (``paca doctor``)."""
        from importlib.metadata import PackageNotFoundError, version

        info = super().describe(device)
        try:
            info["habana_torch_plugin"] = version("habana-torch-plugin")
        except PackageNotFoundError:
            info["habana_torch_plugin"] = None
        try:
            info["habana_frameworks"] = getattr(importlib.import_module("habana_frameworks.torch"), "__version__", None)
        except ImportError:
            info["habana_frameworks"] = None
        try:
            info["total_memory_bytes"] = self._torch_hpu().memory_stats(device).get("Limit")
        except Exception:  # noqa: BLE001 - a report field: unknown rather than an error
            info["total_memory_bytes"] = None
        info["lazy_mode"] = self.lazy_mode()
        info["driver"] = _hl_smi_driver()
        return info

    def free_bytes(self, device: torch.device) -> int | None:
        """``Limit - InUse`` of ``torch.hpu.memory_stats``: the bridge's allocator owns the card's memory."""
        stats = self._torch_hpu().memory_stats(device)
        limit = stats.get("Limit")
        return None if limit is None else max(0, int(limit) - int(stats.get("InUse", 0)))

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        self._torch_hpu().reset_peak_memory_stats(device)

    def synchronize(self, device: torch.device) -> None:
        self._torch_hpu().synchronize()

    def step_boundary(self) -> None:
        """Flush the accumulated lazy graph (``htcore.mark_step``); harmless in eager mode."""
        if self._core is None:
            self.prepare()
        self._core.mark_step()

    # --- streams/events (habana_frameworks.torch.hpu streams.py / events.py) ----------------------
    # The bridge serves one card per process, so its Stream ignores the device argument. Work on HPU
    # streams still executes in program order (DeepSpeed's HPU accelerator relies on that), so events
    # only add ordering the device already guarantees; they stay so the same transfer code is correct.
    # record_stream keeps the base no-op: program order already keeps a buffer alive for later work,
    # and whether the bridge's Tensor.record_stream accepts its Stream wrapper is unverified.

    def _hthpu(self):
        """``habana_frameworks.torch.hpu``, imported on first use."""
        if self._core is None:
            self.prepare()
        return importlib.import_module("habana_frameworks.torch.hpu")

    def new_stream(self, device: torch.device | None = None):
        return self._hthpu().Stream()

    def current_stream(self, device: torch.device | None = None):
        return self._hthpu().current_stream()

    def stream_context(self, stream):
        return self._hthpu().stream(stream)

    def new_event(self, device: torch.device | None = None, enable_timing: bool = False):
        return self._hthpu().Event(enable_timing=enable_timing)

    def pin_memory_supported(self) -> bool:
        return self.is_available()

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pinned for HPU DMA: ``Tensor.pin_memory(torch.device("hpu"))``, as DeepSpeed's HPU accelerator does."""
        return tensor.pin_memory(torch.device("hpu")) if self.pin_memory_supported() else tensor

    # --- fused optimizer / clip norm (habana_frameworks.torch.hpex), HPU graphs --------------------

    def make_adamw(self, params, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) -> torch.optim.Optimizer:
        """Habana's ``hpex.optimizers.FusedAdamW`` when importable, else torch's AdamW.

        FusedAdamW defaults to ``eps=1e-6`` (torch: 1e-8), so ``eps`` is always passed: the same
        arguments give the same update rule on every device. Empty parameter groups crash it and are dropped.
        """
        params = [g for g in params if not (isinstance(g, dict) and not list(g["params"]))]
        try:
            fused_adamw = importlib.import_module("habana_frameworks.torch.hpex.optimizers").FusedAdamW
        except (ImportError, AttributeError) as error:
            logger.warning("Habana FusedAdamW unavailable (%s); using torch.optim.AdamW.", error)
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        logger.info("Optimizer: habana_frameworks FusedAdamW (eps=%g)", eps)
        return fused_adamw(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """Habana's ``FusedClipNorm`` (one fused kernel) when importable, else torch's clip_grad_norm_."""
        parameters = list(parameters)
        try:
            fused_clip_norm = importlib.import_module("habana_frameworks.torch.hpex.normalization").FusedClipNorm
        except (ImportError, AttributeError):
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        # FusedClipNorm puts max_norm on the device in __init__: build it once per value.
        clipper = self._clip_norms.get(max_norm)
        if clipper is None:
            clipper = self._clip_norms[max_norm] = fused_clip_norm(parameters, max_norm)
        return clipper.clip_norm(parameters)

    def capture_graphs(self, module: torch.nn.Module, training: bool, max_graphs: int | None = None) -> torch.nn.Module:
        """HPU graphs, as optimum-habana applies them: ``ModuleCacher`` for training (graphs of forward
        and backward, replayed per input shape), ``wrap_in_hpu_graph`` for inference. Lazy mode only.

        Captured graphs hold gradient tensors by address, so the training loop must zero gradients in
        place (``zero_grad(set_to_none=False)``): ``HPU_GRAPHS.keeps_grad_buffers`` says so.
        """
        if not self.lazy_mode():
            raise DeviceUnavailableError(f"HPU graphs need lazy mode: {self.lazy_mode_requirement(True)}.")
        hthpu = self._hthpu()
        limit = {} if max_graphs is None else {"max_graphs": max_graphs}
        if training:
            return hthpu.ModuleCacher(**limit)(model=module, inplace=True)
        return hthpu.wrap_in_hpu_graph(module, **limit)


def _hl_smi_driver() -> str | None:
    """The Gaudi driver version as ``hl-smi`` reports it (the bridge does not expose it)."""
    import shutil
    import subprocess

    if shutil.which("hl-smi") is None:
        return None
    try:
        done = subprocess.run(["hl-smi", "-Q", "driver_version", "-f", "csv,noheader"], capture_output=True, text=True, timeout=15,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None
