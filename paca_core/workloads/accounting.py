"""Bytes a prepared entry holds, each storage counted once; and MEFT's host-memory row tables, which
train outside autograd and the optimizer and so are counted apart (by the bench and the planner alike)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..layers import AdapterLayer


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views share one; meta tensors and non-tensors count 0)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of an optimizer's state (Adam's moments...); 0 before its first step."""
    if optimizer is None:
        return 0
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def host_tables(module: nn.Module) -> list:
    """Host-memory row tables of MEFT layers (their rows train outside autograd and the optimizer)."""
    return [m.table for m in module.modules() if isinstance(m, AdapterLayer) and m.table is not None]


def table_tensors(table: Any) -> list[torch.Tensor]:
    """Every tensor a row table holds: keys, values and (after a step) their Adam moments."""
    out = []
    for value in vars(table).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out += [v for v in value.values() if isinstance(v, torch.Tensor)]
    return out
