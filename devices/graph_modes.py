"""Graph modes: how a device executes the model (eager, compiled, lazy graphs, captured graphs)."""
from __future__ import annotations

import argparse
import logging
import os

import torch

from .hpu import lazy_mode_enabled
from .registry import runtime_for
from .runtime import DeviceUnavailableError, InvalidDeviceError

logger = logging.getLogger(__name__)

GRAPH_MODES = ("auto", "eager", "compile", "lazy", "cuda-graphs", "hpu-graphs")


def default_graph_mode(device: torch.device) -> str:
    if device.type == "hpu":
        return "lazy" if lazy_mode_enabled() else "eager"
    return "eager"


def resolve_graph_mode(device: torch.device, requested: str | None = "auto") -> str:
    """Validate ``requested`` for ``device``; ``auto`` picks the device's default.

    On HPU the bridge fixes lazy versus eager when it loads, from ``PT_HPU_LAZY_MODE``; asking for
    a mode that contradicts the variable is an error, because the bridge would silently ignore it.
    """
    mode = (requested or "auto").lower()
    if mode not in GRAPH_MODES:
        raise InvalidDeviceError(f"Unknown graph mode {requested!r}; choose one of {', '.join(GRAPH_MODES)}.")
    if mode == "auto":
        mode = default_graph_mode(device)
    supported = runtime_for(device).graph_modes
    if mode not in supported:
        raise DeviceUnavailableError(
            f"Graph mode {mode!r} is not available on {device.type}; it supports {', '.join(supported)}."
        )
    if device.type == "hpu":
        lazy_env = lazy_mode_enabled()
        if mode in ("lazy", "hpu-graphs") and not lazy_env:
            raise DeviceUnavailableError(
                f"Graph mode {mode!r} needs PT_HPU_LAZY_MODE=1 set before Python starts (it is "
                f"{os.environ.get('PT_HPU_LAZY_MODE', 'unset')})."
            )
        if mode in ("eager", "compile") and lazy_env:
            raise DeviceUnavailableError(f"Graph mode {mode!r} needs PT_HPU_LAZY_MODE=0 set before Python starts (it is 1).")
    logger.info("Graph mode: %s on %s", mode, device)
    return mode


def compile_backend(device: torch.device) -> str:
    """The torch.compile backend for a device (Gaudi registers its own; inductor elsewhere)."""
    return "hpu_backend" if device.type == "hpu" else "inductor"


def add_graph_mode_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--graph-mode`` to an argparse parser."""
    parser.add_argument(
        "--graph-mode",
        default="auto",
        choices=GRAPH_MODES,
        help="execution mode: eager, compile (torch.compile), lazy (HPU, PT_HPU_LAZY_MODE=1), "
        "cuda-graphs, hpu-graphs; auto = the device's default (lazy on HPU when PT_HPU_LAZY_MODE=1, else eager)",
    )
    return parser


#: Graph modes whose captured graphs read and write gradient tensors by address: gradients must be
#: zeroed in place (``zero_grad(set_to_none=False)``), never freed and reallocated.
STATIC_GRAD_MODES = frozenset({"hpu-graphs"})
_MODE_ATTRIBUTE = "_paca_graph_mode"


def keeps_grad_buffers(mode: str) -> bool:
    """Whether the training loop must zero gradients in place under ``mode`` (HPU graphs)."""
    return mode in STATIC_GRAD_MODES


def graph_mode_of(module: torch.nn.Module) -> str:
    """The graph mode :func:`apply_graph_mode` gave ``module`` or one of its submodules (``eager`` if none)."""
    for sub in module.modules():
        mode = sub.__dict__.get(_MODE_ATTRIBUTE)
        if mode is not None:
            return mode
    return "eager"


def apply_graph_mode(
    module: torch.nn.Module, device: torch.device, mode: str, training: bool = True, max_graphs: int | None = None
) -> torch.nn.Module:
    """Apply a resolved graph mode to ``module`` in place (parameter names stay unchanged).

    eager and lazy need nothing here: lazy graphs are cut by :func:`devices.step_boundary`, which the
    training loop calls after backward and after the optimizer step. ``hpu-graphs`` captures training
    graphs (``training=True``) or inference graphs, at most ``max_graphs`` input shapes. The mode is
    recorded on the module so the training loop can ask :func:`graph_mode_of` what it must honour.
    """
    if mode == "compile":
        module.compile(backend=compile_backend(device))
    elif mode == "cuda-graphs":
        module.compile(backend="inductor", mode="reduce-overhead")
    elif mode == "hpu-graphs":
        module = runtime_for(device).capture_graphs(module, training=training, max_graphs=max_graphs)
    elif mode not in ("eager", "lazy"):
        raise InvalidDeviceError(f"Unknown graph mode {mode!r}; resolve it with resolve_graph_mode first.")
    module.__dict__[_MODE_ATTRIBUTE] = mode
    return module
