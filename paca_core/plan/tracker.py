"""A dispatch-level tracker of one training step: live bytes by phase, bytes kept for backward,
per-op FLOPs and bytes moved, and the kernel count.

It sits below autograd (a ``TorchDispatchMode``), so it sees every aten op the real code issues,
forward, backward, optimizer and PaCA's column write alike, on real tensors or on fake ones
(``FakeTensorMode``: shapes, dtypes and storages without memory). The same code measures both, which
is how a plan on fake tensors is checked against a step on real CPU tensors (tests/test_plan.py).

Memory is counted per storage, as a caching allocator sees it: a storage is live from the op that
creates it until Python frees it (a weakref finaliser), views cost nothing, and the high-water mark
is kept per phase. Parameters, buffers and optimizer state that exist before the step are the
baseline, given by the caller.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

PHASES = ("forward", "backward", "optimizer", "column_write")

_aten = torch.ops.aten
#: Ops that only describe or allocate: no kernel runs and no bytes move.
_NO_KERNEL = {
    "prim.device",
    "aten.empty",
    "aten.empty_strided",
    "aten.empty_like",
    "aten.new_empty",
    "aten.new_empty_strided",
    "aten.detach",
    "aten.lift_fresh",
    "aten.alias",
    "aten._local_scalar_dense",
    "aten.sym_size",
    "aten.sym_stride",
    "aten.sym_numel",
    "aten.is_same_size",
    "aten.set_",
}


def _gemm_4bit_flops(a, b, shape_b, *args, out_val=None, **kwargs) -> int:
    """bitsandbytes' fused 4-bit GEMM (dequantize + matmul in one kernel): ``a (..., K) @ W (N, K)ᵀ``."""
    return 2 * a.numel() * int(shape_b[0])


#: Ops torch's flop registry does not know. CPU's fused attention ops do the work of the flash kernels
#: (torch counts those): same formula, same arguments. bitsandbytes' 4-bit GEMM/GEMV (QLoRA's forward).
_EXTRA_FLOPS = {
    "aten._scaled_dot_product_flash_attention_for_cpu": flop_registry[_aten._scaled_dot_product_flash_attention],
    "aten._scaled_dot_product_flash_attention_for_cpu_backward": flop_registry[_aten._scaled_dot_product_flash_attention_backward],
    "bitsandbytes.gemm_4bit": _gemm_4bit_flops,
    "bitsandbytes.gemv_4bit": _gemm_4bit_flops,
}


@dataclass
class OpRecord:
    """One aten op as the device would run it."""

    name: str
    phase: str
    kind: str  # "matmul" (has a FLOP formula), "elementwise" (pointwise tag), "other" (reductions, copies, indexing)
    flops: int
    bytes_read: int
    bytes_written: int
    dtype: torch.dtype | None
    inputs: tuple[int, ...] = ()  # ids of input storages (for a profile's fusion rule)
    outputs: tuple[int, ...] = ()
    #: A GEMM's (m, n, k, batch): output rows, output columns, reduction length, independent products (bmm).
    #: None for every other op. The time model's efficiency curve reads it (:mod:`.efficiency`).
    gemm: tuple[int, int, int, int] | None = None
    #: A fused attention kernel's (batch x heads, query length, key length, head dim, causal). None otherwise.
    attention: tuple[int, int, int, int, bool] | None = None

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class StepTrace:
    """What one traced step did; every byte figure is exact for the ops the tracker saw."""

    baseline_bytes: int = 0
    peak_bytes: int = 0
    peak_by_phase: dict[str, int] = field(default_factory=dict)
    saved_bytes: int = 0
    saved_tensors: int = 0
    ops: list[OpRecord] = field(default_factory=list)
    end_bytes: int = 0
    #: Storages live before the step, in the order they were counted: (serial, bytes). An allocator model
    #: (:mod:`.allocator`) places them first.
    baseline_storages: list[tuple[int, int]] = field(default_factory=list)
    #: Every device allocation and free of the step in order: (serial, +bytes) when a storage is created,
    #: (serial, -bytes) when Python frees it. Serials are unique across trackers; zero-byte storages are left out.
    memory_events: list[tuple[int, int]] = field(default_factory=list)
    #: The same for the held-out pass traced after the step (:func:`.trace.trace_step`), if any.
    evaluation_events: list[tuple[int, int]] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def bytes_moved(self) -> int:
        return sum(op.bytes_moved for op in self.ops)

    def summary(self) -> dict[str, Any]:
        by_phase: dict[str, dict[str, int]] = {}
        for op in self.ops:
            row = by_phase.setdefault(op.phase, {"kernels": 0, "flops": 0, "bytes_moved": 0})
            row["kernels"] += 1
            row["flops"] += op.flops
            row["bytes_moved"] += op.bytes_moved
        return {
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_by_phase": dict(self.peak_by_phase),
            "saved_bytes": self.saved_bytes,
            "kernels": self.kernels,
            "flops": self.flops,
            "bytes_moved": self.bytes_moved,
            "by_phase": by_phase,
        }


def _storage(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


_ACTIVE: list["StepTracker"] = []
#: Serial numbers of counted storages, unique in the process (ids of freed storages are reused).
_SERIALS = itertools.count(1)


def active_tracker() -> "StepTracker | None":
    """The tracker recording the current step, if any (for stand-ins that report to it)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Storages created inside the block live in host memory (MEFT's host side): the active tracker, if
    any, keeps them out of the device's live bytes. A no-op when nothing is being traced."""
    tracker = _ACTIVE[-1] if _ACTIVE else None
    if tracker is None:
        yield
        return
    tracker._host_depth += 1
    try:
        yield
    finally:
        tracker._host_depth -= 1


class StepTracker(TorchDispatchMode):
    """Records one step. Use :meth:`phase` to label spans and :meth:`saving` around the forward."""

    def __init__(self, baseline: Iterable[torch.Tensor] = (), host: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.trace = StepTrace()
        self._phase = "forward"
        self._live = 0
        self._known: dict[int, Any] = {}  # id(storage) -> weakref of storages counted (baseline and new)
        self._excluded: set[int] = set()  # host storages (MEFT tables): not device memory
        self._host_depth = 0
        self._recording = True  # allocation events, until the tracker exits
        self._saved_seen: set[int] = set()
        self._saved_kept: list = []
        for tensor in host:
            storage = _storage(tensor)
            if storage is not None:
                self._excluded.add(id(storage))
        self._weights: set[int] = set()
        for tensor in baseline:
            storage = _storage(tensor)
            if storage is not None and id(storage) not in self._excluded and self._track(storage):
                self._weights.add(id(storage))
        self.trace.baseline_bytes = self._live
        self.trace.peak_bytes = self._live
        # What was counted so far existed before the step: the baseline, not the step's allocations.
        self.trace.baseline_storages, self.trace.memory_events = self.trace.memory_events, []

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self._recording = False  # later frees belong to whatever runs next, not to this step
        return super().__exit__(*exc)

    # -- memory --------------------------------------------------------------------------------
    def _track(self, storage) -> bool:
        key = id(storage)
        known = self._known.get(key)
        if known is not None and known() is storage:
            return False
        size = storage.nbytes()
        self._known[key] = weakref.ref(storage)
        self._live += size
        serial = next(_SERIALS)
        if size and self._recording:
            self.trace.memory_events.append((serial, size))
        weakref.finalize(storage, self._free, key, size, serial)
        self._note_peak()
        return True

    def _free(self, key: int, size: int, serial: int = 0) -> None:
        self._live -= size
        self._known.pop(key, None)
        if size and self._recording:
            self.trace.memory_events.append((serial, -size))

    def _note_peak(self) -> None:
        trace = self.trace
        if self._live > trace.peak_bytes:
            trace.peak_bytes = self._live
        if self._live > trace.peak_by_phase.get(self._phase, 0):
            trace.peak_by_phase[self._phase] = self._live

    @property
    def live_bytes(self) -> int:
        return self._live

    def set_phase(self, name: str) -> None:
        """Label the ops from here on (for code that cannot be wrapped in :meth:`phase`, e.g. hooks)."""
        self._phase = name
        self.trace.peak_by_phase[name] = max(self.trace.peak_by_phase.get(name, 0), self._live)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self._phase
        self.set_phase(name)
        try:
            yield
        finally:
            self._phase = previous

    def note_saved(self, tensor: torch.Tensor) -> None:
        """Count ``tensor`` as kept for backward on the device (each storage once, weights excluded); for
        saved-tensor hooks installed inside :meth:`saving` (activation offload), which take over from it."""
        storage = _storage(tensor)
        if storage is not None and id(storage) not in self._weights and id(storage) not in self._excluded \
                and id(storage) not in self._saved_seen:
            self._saved_seen.add(id(storage))
            self._saved_kept.append(storage)  # keeps ids unique while counting
            self.trace.saved_bytes += storage.nbytes()
            self.trace.saved_tensors += 1

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Count what autograd keeps for backward inside the block: each storage once, weights excluded."""
        self._saved_seen, self._saved_kept = set(), []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.note_saved(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self._saved_kept.clear()

    # -- ops -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        if name in _NO_KERNEL:
            self._count_new(out)
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if _is_view(func):
            return out
        new = self._count_new(out)
        flops = self._flops(func, name, args, kwargs, out)
        kind = "matmul" if flops else ("elementwise" if torch.Tag.pointwise in func.tags else "other")
        in_ids = tuple(id(s) for s in map(_storage, inputs) if s is not None)
        out_ids = tuple(id(s) for s in map(_storage, outputs) if s is not None)
        dtype = next((t.dtype for t in outputs + inputs if t.is_floating_point()), None)
        self.trace.ops.append(OpRecord(
            name, self._phase, kind, flops,
            bytes_read=sum(_tensor_bytes(t) for t in inputs),
            bytes_written=sum(_tensor_bytes(t) for t in outputs) if outputs else 0,
            dtype=dtype, inputs=in_ids, outputs=out_ids,
            **(_kernel_shape(func, name, args, kwargs) if flops else {}),
        ))
        del new
        return out

    def _count_new(self, out) -> int:
        added = 0
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = _storage(tensor)
                if storage is None or id(storage) in self._excluded:
                    continue
                if self._host_depth:
                    self._excluded.add(id(storage))  # host memory: never device bytes
                    weakref.finalize(storage, self._excluded.discard, id(storage))
                elif self._track(storage):
                    added += 1
        return added

    @staticmethod
    def _flops(func, name: str, args, kwargs, out) -> int:
        rule = flop_registry.get(func.overloadpacket) or _EXTRA_FLOPS.get(name)
        if rule is None:
            return 0
        return int(rule(*args, **kwargs, out_val=out))


def _bound_arguments(func, args, kwargs) -> dict[str, Any]:
    """The op's arguments by their schema names (positional and keyword alike), defaults filled in."""
    bound: dict[str, Any] = {}
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args) and not argument.kwarg_only:
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


#: GEMMs: the operands whose last two dims are (m, k) and (k, n); leading dims of a bmm are its batch.
_GEMM_OPERANDS = {"aten.mm": ("self", "mat2"), "aten.addmm": ("mat1", "mat2"), "aten.bmm": ("self", "mat2"),
                  "aten.baddbmm": ("batch1", "batch2"), "aten._scaled_mm": ("self", "mat2")}


def _kernel_shape(func, name: str, args, kwargs) -> dict[str, Any]:
    """What the time model needs beyond FLOPs: a GEMM's (m, n, k, batch), or a fused attention kernel's
    (batch x heads, query length, key length, head dim, causal). Empty for other ops with FLOPs."""
    if name in _GEMM_OPERANDS:
        bound = _bound_arguments(func, args, kwargs)
        a, b = (bound[key] for key in _GEMM_OPERANDS[name])
        batch = a.shape[0] if a.dim() == 3 else 1
        return {"gemm": (int(a.shape[-2]), int(b.shape[-1]), int(a.shape[-1]), int(batch))}
    if name.startswith("bitsandbytes.gemm_4bit") or name.startswith("bitsandbytes.gemv_4bit"):
        a, shape_b = args[0], args[2]  # A (..., K) @ W (N, K)ᵀ, W's logical shape given
        k = int(a.shape[-1])
        return {"gemm": (int(a.numel()) // max(1, k), int(shape_b[0]), k, 1)}
    if "attention" in name and hasattr(func, "_schema"):
        bound = _bound_arguments(func, args, kwargs)
        query, key = bound.get("query"), bound.get("key")
        if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.dim() != 4:
            return {}
        # SDPA's ops take (batch, heads, length, dim); the flash/efficient kernels' own ops (batch, length, heads, dim).
        heads_first = name.startswith("aten._scaled_dot_product")
        batch_heads = query.shape[0] * (query.shape[1] if heads_first else query.shape[2])
        q_len, kv_len = (query.shape[2], key.shape[2]) if heads_first else (query.shape[1], key.shape[1])
        causal = bool(bound.get("is_causal", False)) and bound.get("attn_mask") is None and bound.get("attn_bias") is None
        return {"attention": (int(batch_heads), int(q_len), int(kv_len), int(query.shape[-1]), causal)}
    return {}


def _is_view(func) -> bool:
    """Ops whose outputs alias an input without writing: views, no kernel."""
    schema = func._schema
    if not schema.returns:
        return False
    for ret in schema.returns:
        info = ret.alias_info
        if info is None or info.is_write:
            return False
    return True
