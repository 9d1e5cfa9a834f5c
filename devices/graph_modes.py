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


def apply_graph_mode(module: torch.nn.Module, device: torch.device, mode: str) -> torch.nn.Module:
    """Apply a resolved graph mode to ``module`` in place (parameter names stay unchanged).

    eager and lazy need nothing here: lazy graphs are cut by :func:`devices.step_boundary`, which the
    training loop calls after backward and after the optimizer step.
    """
    if mode in ("eager", "lazy"):
        return module
    if mode == "compile":
        module.compile(backend=compile_backend(device))
        return module
    if mode == "cuda-graphs":
        module.compile(backend="inductor", mode="reduce-overhead")
        return module
    raise DeviceUnavailableError(
        f"Graph mode {mode!r} captures inference graphs only (HPU graphs are not used for training by the "
        "Gaudi stack); use lazy or compile for training."
    )
