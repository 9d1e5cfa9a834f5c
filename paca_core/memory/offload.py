"""Activation offload: what autograd saves inside chosen modules goes to host memory during the
forward and comes back for the backward, one module ahead of when it is needed.

Each saved tensor is copied to host on the device's copy stream (``devices.copy_to_host``) as soon
as it is saved, so the device memory is released once the copy has run (the forward goes on meanwhile). In backward, when
the first tensor of module i is needed, module i-1's tensors (the next to be needed, since backward
runs in reverse) start coming back, so their copy overlaps module i's backward.

A tensor saved by several autograd nodes of one module call (a projection input that q, k and v all
keep, or views of it) leaves once and comes back once: saves are matched by their base tensor and view
geometry while that base is alive.

With gradient checkpointing on a chosen module, autograd keeps nothing inside it but the inputs the
recompute needs. The module's checkpoint function is then called inside the module's group, so those
inputs go to host memory in forward and come back, one module ahead, when backward recomputes it —
whichever way the model calls its checkpoint (transformers 4.x checkpoints ``__call__``, 5.x
``forward``). The module's own hooks stay out of the way, so the recompute keeps working.

On a host-only device (CPU) there is nothing to move: the copies are free no-ops, and the offload is
a pass-through (a warning says so).
"""
from __future__ import annotations

import contextlib
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

import devices
from devices import Transfer

from ..surgery.targets import decoder_layers

logger = logging.getLogger(__name__)

#: Tensors smaller than this stay where they are (a copy costs more than the memory it frees).
DEFAULT_MIN_BYTES = 64 * 1024


@dataclass
class OffloadStats:
    """Bytes moved to host (forward) and back (backward), and how many tensors were kept on the device."""

    offloaded_bytes: int = 0
    reloaded_bytes: int = 0
    offloaded_tensors: int = 0
    kept_tensors: int = 0
    #: Saves that reused a tensor already on its way to host (the same data saved by several nodes).
    shared_tensors: int = 0


@dataclass(eq=False)
class _Group:
    """The tensors one module call saved. It lives as long as the autograd graph holds one of them
    (each holds its group; the group holds them weakly), so finished or dropped graphs leave nothing."""

    index: int
    handles: list = field(default_factory=list)  # weak references to _Offloaded
    prefetched: bool = False
    started: bool = False  # backward has asked for one of its tensors

    def prefetch(self) -> None:
        if not self.prefetched:
            self.prefetched = True
            for ref in self.handles:
                handle = ref()
                if handle is not None:
                    handle.prefetch()


class _Offloaded:
    """A saved tensor now in host memory; ``fetch`` brings it back (once)."""

    def __init__(self, to_host: Transfer, device: torch.device, group: _Group):
        self.to_host, self.device, self.group = to_host, device, group
        self._to_device: Transfer | None = None
        self.returned = False

    def prefetch(self) -> None:
        if self._to_device is None:
            self._to_device = devices.copy_to_device(self.to_host.wait(), self.device)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        return self._to_device.wait()


class _CheckpointInGroup:
    """A module's checkpoint function, called inside the module's offload group: the inputs the
    checkpoint keeps for its recompute are then saved through the offload's hooks (to host)."""

    def __init__(self, offload: "ActivationOffload", checkpoint):
        self.offload, self.checkpoint = offload, checkpoint

    def __call__(self, function, *args, **kwargs):
        with self.offload._group():
            return self.checkpoint(function, *args, **kwargs)


class ActivationOffload:
    """Offload saved activations of the modules of ``model`` whose names match ``modules``.

    ``modules``: module names (suffix match, e.g. ``"layers.3"``), a regular expression matched
    against full names (e.g. ``r"model\\.layers\\.\\d+"``), or ``"decoder-layers"`` (every block of
    the model's ``layers``/``h``/``blocks`` list). Use as a handle: :meth:`remove` uninstalls it.
    """

    def __init__(self, model: nn.Module, modules: str | list[str] = "decoder-layers", min_bytes: int = DEFAULT_MIN_BYTES):
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self._groups: weakref.WeakValueDictionary[int, _Group] = weakref.WeakValueDictionary()
        self._next_group = 0
        self._weights = {self._storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self._active: list[object | None] = []
        # Saved tensors on their way to host, by (base tensor, view geometry): a base alive means its storage is.
        self._shared: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        chosen = _select_modules(model, modules)
        self._chosen = chosen
        self._handles = [model.register_forward_pre_hook(lambda *_: self._wrap_checkpointing())]
        for module in chosen:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))
        device = next(model.parameters()).device
        if devices.shares_host_memory(device):
            logger.warning("Activation offload on %s moves nothing: activations already live in host memory.", device)
        logger.info("Offloading saved activations of %d modules to host memory", len(chosen))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._chosen:
            wrapped = getattr(module, "_gradient_checkpointing_func", None)
            if isinstance(wrapped, _CheckpointInGroup) and wrapped.offload is self:
                module._gradient_checkpointing_func = wrapped.checkpoint

    # --- gradient checkpointing: the module's checkpoint runs inside its group ---------------------
    @staticmethod
    def _checkpointed(module: nn.Module) -> bool:
        """Is this call of a transformers layer under its gradient checkpointing (forward or recompute)?"""
        return (bool(getattr(module, "gradient_checkpointing", False)) and module.training and torch.is_grad_enabled()
                and getattr(module, "_gradient_checkpointing_func", None) is not None)

    def _wrap_checkpointing(self) -> None:
        """Route each chosen module's checkpoint through its group (again after gradient_checkpointing_enable)."""
        for module in self._chosen:
            checkpoint = getattr(module, "_gradient_checkpointing_func", None)
            if checkpoint is not None and not isinstance(checkpoint, _CheckpointInGroup):
                module._gradient_checkpointing_func = _CheckpointInGroup(self, checkpoint)

    # --- forward: each module call opens a group and a saved-tensors context -----------------------
    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        group = _Group(self._next_group)
        self._next_group += 1
        self._groups[group.index] = group
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, group), self._unpack):
            yield

    def _enter(self, module: nn.Module, args) -> None:
        if self._checkpointed(module):
            # Its checkpoint keeps the inputs (saved in the group _CheckpointInGroup opens) and nothing inside:
            # hooks of ours inside the checkpoint would take its saves and undo the checkpointing.
            self._wrap_checkpointing()
            self._active.append(None)
            return
        context = self._group()
        context.__enter__()
        self._active.append(context)

    def _exit(self, module: nn.Module, args, output) -> None:
        if self._active:
            context = self._active.pop()
            if context is not None:
                context.__exit__(None, None, None)

    @staticmethod
    def _storage_key(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self.stats.kept_tensors += 1
        return tensor

    def _to_host(self, tensor: torch.Tensor) -> Transfer:
        return devices.copy_to_host(tensor)

    def _handle(self, to_host: Transfer, device: torch.device, group: _Group) -> "_Offloaded":
        return _Offloaded(to_host, device, group)

    def _pack(self, tensor: torch.Tensor, group: _Group):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes or self._storage_key(tensor) in self._weights:
            return self._keep(tensor)
        key, base = _view_key(tensor, group)
        known = self._shared.get(key)
        shared = known[1]() if known is not None and known[0]() is base else None
        if shared is not None:  # the same data is already on its way to host
            self.stats.shared_tensors += 1
            return shared
        to_host = self._to_host(tensor)
        if to_host.nbytes == 0:  # already in host memory: nothing moved
            return self._keep(tensor)
        handle = self._handle(to_host, tensor.device, group)
        group.handles.append(weakref.ref(handle))
        self._shared[key] = (weakref.ref(base, lambda _, key=key: self._shared.pop(key, None)), weakref.ref(handle))
        self.stats.offloaded_bytes += nbytes
        self.stats.offloaded_tensors += 1
        return handle

    # --- backward: bring this group's tensors back and start the previous group's ----------------
    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        group = packed.group
        if not group.started:  # backward reached this module: its tensors now, the previous module's next
            group.started = True
            group.prefetch()
            previous = self._groups.get(group.index - 1)  # the next one backward will need
            if previous is not None:
                previous.prefetch()
        tensor = packed.fetch()
        if not packed.returned:  # a shared handle comes back once
            packed.returned = True
            self.stats.reloaded_bytes += tensor.numel() * tensor.element_size()
        return tensor


def _view_key(tensor: torch.Tensor, group: _Group) -> tuple[tuple, torch.Tensor]:
    """(key, base): saves of the same data in one module call share a key while ``base`` (the tensor a
    view was taken of) lives. Not across calls: a call's tensors come back together, one call ahead."""
    base = tensor._base if tensor._base is not None else tensor
    key = (group.index, id(base), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
           tensor._version)
    return key, base


def _select_modules(model: nn.Module, modules: str | list[str]) -> list[nn.Module]:
    named = dict(model.named_modules())
    if modules == "decoder-layers":
        chosen = decoder_layers(model)
    elif isinstance(modules, str):
        regex = re.compile(modules)
        chosen = [m for n, m in named.items() if n and regex.fullmatch(n)]
    else:
        chosen = [m for n, m in named.items() if n and any(n == t or n.endswith("." + t) for t in modules)]
    if not chosen:
        raise ValueError(
            f"Activation offload: {modules!r} matched no module; pass 'decoder-layers', module names, or a regex of full names."
        )
    return chosen


def offload_activations(model: nn.Module, modules: str | list[str] = "decoder-layers", min_bytes: int = DEFAULT_MIN_BYTES) -> ActivationOffload:
    """Install activation offload on ``model`` (see :class:`ActivationOffload`); returns the handle."""
    return ActivationOffload(model, modules, min_bytes)
