"""Per-layer seeds and PaCA's deterministic column choice.

:func:`layer_seed` is public API: every random tensor an adapter layer draws (PaCA's columns, LoRA's A, MEFT's
keys and router, a plug-in's frozen projection) is seeded from it, through ``AdapterLayer.generator``. A tensor
that a checkpoint does not hold is rebuilt from it on load, in another process, so it must never depend on
Python's ``hash()`` (salted per process) or on the global RNG's state.
"""
from __future__ import annotations

import hashlib

import torch


def layer_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from the config's ``seed`` and the module name (SHA-256 of both): different for every layer,
    and the same in every process, on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def select_columns(in_features: int, r: int, seed: int, module_name: str) -> torch.Tensor:
    """``r`` distinct input-column indices in ``[0, in_features)``, sorted, as int64 on CPU."""
    if r > in_features:
        raise ValueError(f"r={r} exceeds in_features={in_features} of {module_name}")
    generator = torch.Generator().manual_seed(layer_seed(seed, module_name))
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def check_columns(indices: torch.Tensor, in_features: int, module_name: str) -> None:
    """Reject column indices read from a file that cannot be this layer's (out of range or repeated)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= in_features):
        raise ValueError(f"{module_name} has column indices outside [0, {in_features}).")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"{module_name} has repeated column indices; the file is corrupt.")
