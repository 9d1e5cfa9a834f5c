"""Exact activation-memory accounting on any device: bytes autograd keeps for backward."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn


@dataclass
class SavedTensorReport:
    """What one forward kept for backward, parameters (and views of them) excluded."""

    activation_bytes: int
    tensors: int
    saved: list = field(default_factory=list)

    def per_token(self, tokens: int) -> float:
        return self.activation_bytes / max(1, tokens)


@contextlib.contextmanager
def count_saved_tensors(model: nn.Module) -> Iterator[SavedTensorReport]:
    """Count bytes packed by ``torch.autograd.graph.saved_tensors_hooks`` inside the block.

    Tensors sharing storage with a parameter or buffer of ``model`` cost no activation memory and
    are skipped; a storage saved twice is counted once.
    """
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    report = SavedTensorReport(0, 0)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in weights and pointer not in seen and tensor.device.type != "meta":
            seen.add(pointer)
            report.activation_bytes += storage.nbytes()
            report.tensors += 1
            report.saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield report
