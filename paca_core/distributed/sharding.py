"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for adapted models.

FSDP2 turns every parameter into a DTensor sharded on dim 0 between steps, and all-gathers it for
each module's forward and backward. Most adapter code never notices; three places must see through
the DTensors, and this module is where they do it:

* PaCA keeps its frozen weight *adapted* (selected columns = original + scaling·delta). The weight's
  and the delta's row shards line up (both have the output features as dim 0), so each rank
  rewrites the columns of its own rows after the optimizer step, communication-free
  (:func:`local_rows`).
* Checkpoints gather full tensors (:func:`full_tensor`, a collective: every rank calls it) so the
  adapter saved by an FSDP run loads in a single process, and loading lays full tensors out like the
  shards they go into (:func:`shard_like`).
* Optimizer state is saved as full tensors and re-sharded on resume
  (:func:`gathered_optimizer_state`, :func:`load_optimizer_state`), so a resume does not depend on
  the number of processes.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn as nn

import devices

from ..surgery.targets import decoder_layers

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter managed by FSDP2 between steps)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's part of ``tensor`` (a view: writes reach the shard) and the global rows it holds.

    A plain tensor is its own local part. Supports FSDP's layouts: ``Shard(0)`` and ``Replicate``
    on any mesh dimension (FSDP and HSDP).
    """
    if not is_sharded(tensor):
        return tensor, slice(0, tensor.shape[0])
    start, length = 0, tensor.shape[0]
    mesh = tensor.device_mesh
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(0):
            raise NotImplementedError(
                f"A tensor sharded as {tensor.placements} cannot be adapted here: adapters support FSDP's dim-0 "
                "sharding (Shard(0)) and replication; tensor-parallel column sharding is not supported."
            )
        parts, coordinate = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        chunk = math.ceil(length / parts)  # torch.chunk's split, which FSDP2 uses
        first = min(coordinate * chunk, length)
        start, length = start + first, min(first + chunk, length) - first
    local = tensor.to_local()
    if local.shape[0] != length:
        raise RuntimeError(
            f"Unexpected shard layout: {tuple(local.shape)} locally for a {tuple(tensor.shape)} tensor laid out as "
            f"{tensor.placements} (expected {length} rows). Please report this with your torch version ({torch.__version__})."
        )
    return local, slice(start, start + length)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor. A collective for DTensors and ZeRO-3 parameters: every rank must call it, in the same order."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    if hasattr(tensor, "ds_tensor"):  # a DeepSpeed ZeRO-3 parameter (paca_core/distributed/zero.py)
        from .zero import full_parameter

        return full_parameter(tensor)
    return tensor


def wrap_local(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A tensor made of each rank's ``local`` rows, laid out like ``reference`` (plain if it is plain)."""
    if not is_sharded(reference):
        return local
    shape = (reference.shape[0], *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return _dtensor_class().from_local(
        local.contiguous(), reference.device_mesh, reference.placements, run_check=False, shape=shape, stride=stride
    )


def gather_rows(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` rows stacked into the whole tensor (a collective when ``reference`` is sharded)."""
    return full_tensor(wrap_local(local, reference))


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``reference`` (same mesh and placements), ready for ``reference.copy_``.

    No communication: every rank holds ``full`` and keeps its own rows.
    """
    if not is_sharded(reference):
        return full
    _, rows = local_rows(reference)
    return wrap_local(full[rows].to(reference.to_local().device), reference)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


# --- optimizer state --------------------------------------------------------------------------------
def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded state gathered to full tensors (a collective when sharded)."""
    state_dict = optimizer.state_dict()
    for index in sorted(state_dict["state"]):  # the same order on every rank
        entry = state_dict["state"][index]
        for key in sorted(entry):
            if is_sharded(entry[key]):
                entry[key] = entry[key].full_tensor()
    return state_dict


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict`` that re-shards full state tensors like their (sharded) parameters."""
    parameters = _optimizer_parameters(optimizer)
    for index, entry in state_dict["state"].items():
        if not 0 <= int(index) < len(parameters):
            continue  # load_state_dict reports the mismatch
        parameter = parameters[int(index)]
        if not is_sharded(parameter):
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and not is_sharded(value) and tuple(value.shape) == tuple(parameter.shape):
                entry[key] = shard_like(value, parameter)
    optimizer.load_state_dict(state_dict)


# --- sharding a prepared model ------------------------------------------------------------------------
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # public from torch 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
        except ImportError:
            raise RuntimeError(f"FSDP2 (fully_shard) needs torch >= 2.4; this is torch {torch.__version__}.") from None
    return fully_shard


def _refuse_device_map(model: nn.Module) -> None:
    """FSDP distributes a model each process holds whole; accelerate's device_map placement contradicts that."""
    from ..surgery.placement import PlacementError, dispatched_devices

    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    if offloaded or dispatched_devices(model):
        raise PlacementError(
            "FSDP cannot shard a model loaded with a device_map (accelerate hooks"
            f"{', offloaded parameters such as ' + offloaded[0] if offloaded else ''}): FSDP places every shard "
            "itself. Load the model without device_map in each process, then prepare_model and shard_model."
        )


def shard_model(adapted_model: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``adapted_model`` with FSDP2 over all processes: each decoder layer is one unit, the rest
    (embeddings, head) the root. Frozen base weights and adapters are sharded alike; only adapter
    gradients are reduce-scattered. Call after ``prepare_model`` and before building the optimizer.
    """
    import torch.distributed as dist

    _refuse_device_map(adapted_model)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs a process group: launch with torchrun (or accelerate launch) and call devices.init_distributed first.")
    refusing = sorted({type(layer).__name__ for layer in adapted_model.adapter_layers().values() if not layer.shardable})
    if refusing:
        raise NotImplementedError(
            f"{', '.join(refusing)} cannot be sharded with FSDP yet (its state is not a plain parameter); train it with "
            "DDP (drop --fsdp) instead."
        )
    fully_shard = _fully_shard()
    mesh = devices.device_mesh(device)
    base = adapted_model.base_model
    units = decoder_layers(base)
    if not units:
        raise ValueError("FSDP: found no decoder layers (a ModuleList named layers/h/blocks) to shard; the model is not a known decoder.")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(base, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for layer in adapted_model.adapter_layers().values():
        layer.mark_sharded()
    logger.info("FSDP2: %d decoder layers sharded over %d processes on %s", len(units), dist.get_world_size(), device)
    return adapted_model
