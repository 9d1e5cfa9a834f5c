"""Graph modes: how a device executes the model (eager, compiled, lazy graphs, captured graphs).

Which modes exist, which device supports which, the default, the lazy-mode rules and the
torch.compile backend all come from the registered runtimes' :class:`~devices.runtime.GraphMode`
declarations; this module names no device.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from ._torch import torch

from .registry import registered_runtimes, runtime_for
from .runtime import DeviceRuntime, DeviceUnavailableError, GraphMode, InvalidDeviceError

logger = logging.getLogger(__name__)

_MODE_ATTRIBUTE = "_paca_graph_mode"


def graph_mode_choices() -> tuple[str, ...]:
    """``auto`` plus every mode some registered runtime supports, in registration order."""
    names = ["auto"]
    for runtime in registered_runtimes():
        names += [mode.name for mode in runtime.graph_modes if mode.name not in names]
    return tuple(names)


def __getattr__(name: str) -> Any:
    # GRAPH_MODES follows the registered runtimes on every access (PEP 562).
    if name == "GRAPH_MODES":
        return graph_mode_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _declared(name: str, first: DeviceRuntime | None = None) -> GraphMode | None:
    """The declaration of mode ``name``: ``first``'s own if it has one, else any registered runtime's."""
    runtimes = ([first] if first is not None else []) + list(registered_runtimes())
    for runtime in runtimes:
        for mode in runtime.graph_modes:
            if mode.name == name:
                return mode
    return None


def default_graph_mode(device: torch.device) -> str:
    """The mode ``auto`` means on ``device`` (e.g. lazy on HPU when PT_HPU_LAZY_MODE=1, else eager)."""
    return runtime_for(device).default_graph_mode()


def resolve_graph_mode(device: torch.device, requested: str | None = "auto") -> str:
    """Validate ``requested`` for ``device``; ``auto`` picks the device's default.

    A mode the device supports can still be refused by its runtime's lazy-mode rule: on HPU the
    bridge fixes lazy versus eager when it loads, from ``PT_HPU_LAZY_MODE``, and would silently
    ignore a contradicting request, so that is an error here.
    """
    mode = (requested or "auto").lower()
    if mode not in graph_mode_choices():
        raise InvalidDeviceError(f"Unknown graph mode {requested!r}; choose one of {', '.join(graph_mode_choices())}.")
    runtime = runtime_for(device)
    if mode == "auto":
        mode = runtime.default_graph_mode()
    supported = [m.name for m in runtime.graph_modes]
    if mode not in supported:
        raise DeviceUnavailableError(
            f"Graph mode {mode!r} is not available on {device.type}; it supports {', '.join(supported)}."
        )
    problem = runtime.graph_mode_problem(_declared(mode, runtime))
    if problem:
        raise DeviceUnavailableError(problem)
    logger.info("Graph mode: %s on %s", mode, device)
    return mode


def compile_backend(device: torch.device) -> str:
    """The torch.compile backend for a device (its runtime's ``compile_backend``)."""
    return runtime_for(device).compile_backend


def add_graph_mode_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--graph-mode`` to an argparse parser (choices and help from the registered runtimes)."""
    runtimes = registered_runtimes()
    described = []
    for name in graph_mode_choices()[1:]:
        mode = _declared(name)
        owners = [r.name for r in runtimes if any(m.name == name for m in r.graph_modes)]
        where = "" if len(owners) == len(runtimes) else ", ".join(owners)
        note = "; ".join(filter(None, [mode.help, where]))
        described.append(f"{name} ({note})" if note else name)
    defaults = ", ".join(f"{r.name} {r.default_graph_mode()}" for r in runtimes)
    lazy_rules = []
    for runtime in runtimes:
        lazy = [m.name for m in runtime.graph_modes if m.needs_lazy]
        if lazy:
            verb = "need" if len(lazy) > 1 else "needs"
            lazy_rules.append(f"{' and '.join(lazy)} {verb} {runtime.lazy_mode_requirement(True)}")
    parser.add_argument(
        "--graph-mode",
        default="auto",
        choices=graph_mode_choices(),
        help=f"execution mode: {', '.join(described)}; auto = the device's default (here: {defaults})"
        + "".join(f"; {rule}" for rule in lazy_rules),
    )
    return parser


def keeps_grad_buffers(mode: str) -> bool:
    """Whether the training loop must zero gradients in place under ``mode`` (captured HPU graphs)."""
    declared = _declared(mode)
    return bool(declared is not None and declared.keeps_grad_buffers)


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

    Compiled modes run ``module.compile`` with the device's backend; captured modes ask the runtime
    to capture graphs (``training=True`` for training graphs, else inference graphs, at most
    ``max_graphs`` input shapes); eager and lazy need nothing here (lazy graphs are cut by
    :func:`devices.step_boundary`, which the training loop calls after backward and after the
    optimizer step). The mode is recorded on the module so the training loop can ask
    :func:`graph_mode_of` what it must honour.
    """
    runtime = runtime_for(device)
    declared = _declared(mode, runtime)
    if declared is None:
        raise InvalidDeviceError(f"Unknown graph mode {mode!r}; resolve it with resolve_graph_mode first.")
    if declared.compiled:
        module.compile(backend=runtime.compile_backend)
    elif declared.captured:
        module = runtime.capture_graphs(module, training=training, max_graphs=max_graphs)
    module.__dict__[_MODE_ATTRIBUTE] = mode
    return module
