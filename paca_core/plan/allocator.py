"""What a traced step costs the device's allocator: its allocation and free events replayed through a model
of the runtime's allocator, giving ``reserved_peak`` beside ``allocated_peak``.

The tracker counts the bytes each storage holds (``live``). A device runtime hands out more: sizes are
rounded, a request is served from a cached block that may be larger than asked for, and blocks are carved
from segments that are never given back during a step. Which rule applies is data in the device profile
(``allocator`` in ``devices/profiles.json``, every constant with its source); this module only replays.

Rules (one per runtime kind):

* ``cuda_caching``: PyTorch's CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp): sizes rounded up to
  ``min_block_bytes``; requests up to ``small_size_bytes`` from ``small_buffer_bytes`` segments, larger ones
  from a ``large_buffer_bytes`` segment below ``min_large_alloc_bytes`` and from a segment of their own size
  rounded to ``round_large_bytes`` above it; a free block is reused by best fit (smallest block that holds
  the request, lowest address on ties) within its pool; a block is split when the rest is at least
  ``min_block_bytes`` (small pool) or more than ``small_size_bytes`` (large pool); freed neighbours merge;
  segments stay reserved (no ``empty_cache``). With ``max_split_bytes`` (``max_split_size_mb``) the
  oversize rules apply: such blocks are never split and serve only requests within ``large_buffer_bytes``.
  ``allocated`` counts block sizes (``max_memory_allocated``), ``reserved`` segments (``max_memory_reserved``).
* ``hpu_pool``: the Intel Gaudi PyTorch bridge's default pool (CoalescedStringentPooling): one pool taken at
  start-up, sizes aligned to ``alignment_bytes``, requests below ``small_alloc_threshold_bytes`` from a
  fixed ``small_alloc_region_bytes`` region, others by best fit over free chunks, split when the chunk is at
  least twice the request, or the rest is at least ``max_internal_fragmentation_bytes``, or the request is
  below ``split_fraction`` of the chunk. Its ``reserved`` is the pool's high-water mark (how far into the pool
  the step reaches), because ``torch.hpu.memory_reserved()`` reports the whole pool from the start.
* ``exact``: allocations go straight to the host allocator and come back on free (CPU), so
  reserved == allocated == live.

The step is replayed as a run meets it: library workspaces and the model's storages first, then the step,
the held-out pass and the step again (a second step reuses the first one's cached blocks, so the reserved
peak it reaches is the steady state's). The planner traces 1 and 2 layers, and which cached block a request
lands in depends on the whole stack, so :func:`extend_depth` first turns the two traces into the events of the
full stack (the deeper trace's extra layer, repeated). Not modelled: several streams (FSDP/NCCL ``record_stream`` delays a
block's reuse), the allocator's free-and-retry when the device is full (it releases unsplit cached segments
before it raises out-of-memory: the plan does not count on that, so it is cautious), and the order in which
weights were loaded (the replay allocates them in the order the model lists them).
"""
from __future__ import annotations

import bisect
import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

#: The constants each rule needs (``devices/profiles.json`` ``allocator``), besides ``rule``.
RULE_CONSTANTS: dict[str, tuple[str, ...]] = {
    "cuda_caching": ("min_block_bytes", "small_size_bytes", "small_buffer_bytes", "min_large_alloc_bytes",
                     "large_buffer_bytes", "round_large_bytes"),
    "hpu_pool": ("alignment_bytes", "small_alloc_threshold_bytes", "small_alloc_region_bytes",
                 "max_internal_fragmentation_bytes", "split_fraction"),
    "exact": (),
}
#: Constants a rule may have (absent: the runtime's default, which switches the behaviour off).
RULE_OPTIONAL: dict[str, tuple[str, ...]] = {"cuda_caching": ("max_split_bytes",)}


@dataclass(frozen=True)
class AllocatorRule:
    """One allocator model and its constants (bytes unless the name says otherwise)."""

    kind: str
    constants: Mapping[str, float]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "AllocatorRule":
        """The profile's ``allocator`` entry; None (a profile without one) is the ``exact`` rule."""
        if not data:
            return cls("exact", {})
        kind = data.get("rule")
        if kind not in RULE_CONSTANTS:
            raise ValueError(f"allocator rule {kind!r} is not one of {', '.join(RULE_CONSTANTS)}")
        constants = {k: v for k, v in data.items() if k != "rule"}
        missing = [k for k in RULE_CONSTANTS[kind] if k not in constants]
        unknown = [k for k in constants if k not in RULE_CONSTANTS[kind] + RULE_OPTIONAL.get(kind, ())]
        if missing or unknown:
            raise ValueError(f"allocator rule {kind!r}: missing constants {missing}, unknown constants {unknown}")
        return cls(kind, constants)

    def key(self) -> tuple:
        return (self.kind, tuple(sorted(self.constants.items())))


@dataclass(frozen=True)
class AllocatorPeaks:
    """High-water marks of one replay, in bytes."""

    live_peak: int  # the bytes the storages ask for (the tracker's peak, plus workspaces)
    allocated_peak: int  # blocks handed out (torch.cuda.max_memory_allocated)
    reserved_peak: int  # segments or pool taken from the device (torch.cuda.max_memory_reserved)

    def as_dict(self) -> dict[str, int]:
        return {"live_peak": self.live_peak, "allocated_peak": self.allocated_peak, "reserved_peak": self.reserved_peak}


class _Block:
    __slots__ = ("size", "offset", "segment", "pool", "allocated", "prev", "next")

    def __init__(self, size: int, offset: int, segment: int, pool: str):
        self.size, self.offset, self.segment, self.pool = size, offset, segment, pool
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        """Best-fit order: size, then address (segment in creation order, offset in it)."""
        return (self.size, self.segment, self.offset)


class _Allocator:
    """Shared bookkeeping: live (requested), allocated (blocks) and reserved bytes, and their peaks."""

    def __init__(self) -> None:
        self.live = self.allocated = self.reserved = 0
        self.peak_live = self.peak_allocated = self.peak_reserved = 0
        self._free: dict[str, list[tuple[int, int, int]]] = {}
        self._blocks: dict[tuple[int, int, int], _Block] = {}

    def _note(self) -> None:
        if self.live > self.peak_live:
            self.peak_live = self.live
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _insert_free(self, block: _Block) -> None:
        key = (block.size, block.segment, block.offset)
        free = self._free.get(block.pool)
        if free is None:
            free = self._free[block.pool] = []
        bisect.insort(free, key)
        self._blocks[key] = block

    def _remove_free(self, block: _Block) -> None:
        key = (block.size, block.segment, block.offset)
        free = self._free[block.pool]
        del free[bisect.bisect_left(free, key)]
        del self._blocks[key]

    def _best_fit(self, pool: str, size: int) -> _Block | None:
        free = self._free.get(pool, [])
        index = bisect.bisect_left(free, (size, -1, -1))
        return self._blocks[free[index]] if index < len(free) else None

    def _split(self, block: _Block, size: int) -> None:
        rest = _Block(block.size - size, block.offset + size, block.segment, block.pool)
        rest.prev, rest.next = block, block.next
        if block.next is not None:
            block.next.prev = rest
        block.next, block.size = rest, size
        self._insert_free(rest)

    def _merge_free_neighbours(self, block: _Block) -> _Block:
        for neighbour in (block.prev, block.next):
            if neighbour is None or neighbour.allocated:
                continue
            self._remove_free(neighbour)
            if neighbour is block.prev:
                neighbour.size += block.size
                neighbour.next = block.next
                if block.next is not None:
                    block.next.prev = neighbour
                block = neighbour
            else:
                block.size += neighbour.size
                block.next = neighbour.next
                if neighbour.next is not None:
                    neighbour.next.prev = block
        return block

    def malloc(self, request: int) -> Any:
        raise NotImplementedError

    def free(self, handle: Any) -> None:
        raise NotImplementedError


class CachingAllocator(_Allocator):
    """PyTorch's CUDACachingAllocator, one stream, as the module docstring states it."""

    def __init__(self, constants: Mapping[str, float]):
        super().__init__()
        c = {k: int(v) for k, v in constants.items()}
        self.min_block, self.small_size, self.small_buffer = c["min_block_bytes"], c["small_size_bytes"], c["small_buffer_bytes"]
        self.min_large_alloc, self.large_buffer, self.round_large = (c["min_large_alloc_bytes"], c["large_buffer_bytes"],
                                                                     c["round_large_bytes"])
        self.max_split = c.get("max_split_bytes", math.inf)
        self._segments = 0

    def round_size(self, request: int) -> int:
        """``round_size``: at least one ``min_block``, a multiple of it."""
        return max(self.min_block, -(-request // self.min_block) * self.min_block)

    def segment_size(self, size: int) -> int:
        """``get_allocation_size``: what a new segment for a request of ``size`` (rounded) takes from the device."""
        if size <= self.small_size:
            return self.small_buffer
        if size < self.min_large_alloc:
            return self.large_buffer
        return -(-size // self.round_large) * self.round_large

    def _usable(self, block: _Block | None, size: int) -> bool:
        """``get_free_block``'s oversize rules (inactive while ``max_split`` is unlimited, the default)."""
        if block is None:
            return False
        if size < self.max_split and block.size >= self.max_split:
            return False
        return not (size >= self.max_split and block.size >= size + self.large_buffer)

    def malloc(self, request: int) -> _Block:
        size = self.round_size(request)
        pool = "small" if size <= self.small_size else "large"
        block = self._best_fit(pool, size)
        if self._usable(block, size):
            self._remove_free(block)
        else:
            segment = self.segment_size(size)
            self._segments += 1
            block = _Block(segment, 0, self._segments, pool)
            self.reserved += segment
        remaining = block.size - size
        if pool == "small":
            split = remaining >= self.min_block
        else:
            split = size < self.max_split and remaining > self.small_size
        if split:
            self._split(block, size)
        block.allocated = True
        self.allocated += block.size
        self.live += request
        self._note()
        return block

    def free(self, handle: tuple[_Block, int]) -> None:
        block, request = handle
        block.allocated = False
        self.allocated -= block.size
        self.live -= request
        self._insert_free(self._merge_free_neighbours(block))


class PoolAllocator(_Allocator):
    """The Gaudi bridge's coalesced pool: one address space taken at start-up, best fit, split and merge.

    The bridge merges freed chunks lazily (least-frequently-used merging) but merges before it gives up on
    a request, so for whether a step fits, merging at free time is taken as equivalent (an assumption)."""

    _TAIL = 1 << 62  # the untouched rest of the pool: larger than any request

    def __init__(self, constants: Mapping[str, float]):
        super().__init__()
        self.align = int(constants["alignment_bytes"])
        self.small_threshold = int(constants["small_alloc_threshold_bytes"])
        self.small_region = int(constants["small_alloc_region_bytes"])
        self.max_internal = int(constants["max_internal_fragmentation_bytes"])
        self.split_fraction = float(constants["split_fraction"])
        self.small_used = 0
        self._insert_free(_Block(self._TAIL, self.small_region, 0, "pool"))
        self.reserved = self.small_region  # the small-allocation region is carved out at creation
        self._note()

    def malloc(self, request: int) -> Any:
        size = max(self.align, -(-request // self.align) * self.align)
        self.live += request
        if size < self.small_threshold and self.small_used + size <= self.small_region:
            self.small_used += size
            self.allocated += size
            self._note()
            return ("small", size)
        block = self._best_fit("pool", size)
        self._remove_free(block)
        if block.size > size and (block.size >= 2 * size or block.size - size >= self.max_internal
                                  or size < math.ceil(self.split_fraction * block.size)):
            self._split(block, size)
        block.allocated = True
        self.allocated += block.size
        self.reserved = max(self.reserved, block.offset + block.size)
        self._note()
        return block

    def free(self, handle: tuple[Any, int]) -> None:
        block, request = handle
        self.live -= request
        if isinstance(block, tuple):
            self.small_used -= block[1]
            self.allocated -= block[1]
            return
        block.allocated = False
        self.allocated -= block.size
        self._insert_free(self._merge_free_neighbours(block))


class ExactAllocator(_Allocator):
    """Every byte asked for is taken from the host allocator and given back on free."""

    def malloc(self, request: int) -> int:
        for name in ("live", "allocated", "reserved"):
            setattr(self, name, getattr(self, name) + request)
        self._note()
        return request

    def free(self, handle: tuple[int, int]) -> None:
        _, request = handle
        for name in ("live", "allocated", "reserved"):
            setattr(self, name, getattr(self, name) - request)


def make_allocator(rule: AllocatorRule) -> _Allocator:
    return {"cuda_caching": CachingAllocator, "hpu_pool": PoolAllocator}.get(rule.kind, lambda c: ExactAllocator())(rule.constants)


class _Replay:
    """An allocator and the handles of the storages it holds, by serial."""

    def __init__(self, rule: AllocatorRule):
        self.allocator = make_allocator(rule)
        self.held: dict[int, tuple[Any, int]] = {}

    def alloc(self, serial: int, size: int) -> None:
        if serial in self.held:  # a storage counted twice: keep the first
            return
        self.held[serial] = (self.allocator.malloc(size), size)

    def free(self, serial: int) -> None:
        handle = self.held.pop(serial, None)
        if handle is not None:
            self.allocator.free(handle)

    def run(self, events: Iterable[tuple[int, int]]) -> set[int]:
        """Replay ``events``; returns the serials it allocated that are still held."""
        started = set()
        for serial, size in events:
            if size > 0:
                self.alloc(serial, size)
                started.add(serial)
            else:
                self.free(serial)
                started.discard(serial)
        return started

    def release(self, serials: Iterable[int]) -> None:
        for serial in serials:
            self.free(serial)


def replay(rule: AllocatorRule, step_events: Sequence[tuple[int, int]], baseline: Sequence[tuple[int, int]] = (),
           evaluation_events: Sequence[tuple[int, int]] = (), workspaces: Sequence[int] = ()) -> AllocatorPeaks:
    """Replay one traced step through ``rule``'s allocator (order: module docstring) and return its peaks.

    ``baseline``: (serial, bytes) of the storages live before the step; ``step_events`` /
    ``evaluation_events``: (serial, +bytes) allocations and (serial, -bytes) frees; ``workspaces``: byte sizes
    of library workspaces allocated through the same allocator and kept for the run (cuBLAS)."""
    state = _Replay(rule)
    for index, size in enumerate(workspaces):
        state.alloc(-1 - index, int(size))
    for serial, size in baseline:
        state.alloc(serial, size)
    for events in (step_events, evaluation_events, step_events):
        state.release(state.run(events))  # what outlives a pass (the loss, a step's returns) is dropped before the next
    a = state.allocator
    return AllocatorPeaks(a.peak_live, a.peak_allocated, max(a.peak_reserved, a.peak_allocated))


def replay_trace(trace, rule: AllocatorRule, workspaces: Sequence[int] = ()) -> AllocatorPeaks:
    """:func:`replay` of a :class:`~.tracker.StepTrace` (or of a :class:`DeepStep` from :func:`extend_depth`)."""
    return replay(rule, trace.memory_events, trace.baseline_storages, trace.evaluation_events, workspaces)


# -- depth --------------------------------------------------------------------------------------------------------
class DepthExtensionError(ValueError):
    """Two traces do not differ by repeated layers only (the caller falls back to its own estimate)."""


@dataclass
class DeepStep:
    """The allocation events of a deeper stack than was traced (:func:`extend_depth`), in a trace's shape."""

    baseline_storages: list[tuple[int, int]]
    memory_events: list[tuple[int, int]]
    evaluation_events: list[tuple[int, int]]


def _tokens(events: Sequence[tuple[int, int]]) -> list[tuple[str, int]]:
    return [("a" if size > 0 else "f", abs(size)) for _, size in events]


def _inserted(short: Sequence[tuple[int, int]], long: Sequence[tuple[int, int]]) -> tuple[list[int | None], list[bool]]:
    """Align two event streams whose only difference is inserted events (a repeated layer): for each event of
    ``long``, the index of the ``short`` event it matches (None when inserted), and whether it was inserted."""
    matcher = difflib.SequenceMatcher(None, _tokens(short), _tokens(long), autojunk=False)
    match: list[int | None] = [None] * len(long)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            match[j1:j2] = range(i1, i2)
        elif tag != "insert":
            raise DepthExtensionError(f"the deeper trace is not the shallower one plus a layer ({tag} at event {j1})")
    return match, [m is None for m in match]


class _Classes:
    """Union-find over serials: storages that play the same part in successive layers (a layer's input is the
    previous layer's output)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _roles(short_events, long_events, match, short_alloc_at: dict[int, int], long_serial_at: dict[int, int],
           classes: _Classes) -> None:
    """Where the deeper trace frees a different storage than the shallower one at the matching event, the two
    storages play the same part one layer apart (e.g. the head frees the last layer's output): join their classes."""
    for j, (serial, size) in enumerate(long_events):
        i = match[j]
        if size >= 0 or i is None:
            continue
        short_alloc = short_alloc_at.get(short_events[i][0])  # where the shallow trace allocated what it frees here
        if short_alloc is None:
            continue
        counterpart = long_serial_at.get(short_alloc)  # the deep trace's storage allocated at the matching place
        if counterpart is not None and counterpart != serial:
            classes.union(serial, counterpart)


def extend_depth(short, long, extra_layers: int) -> DeepStep:
    """The allocation events of a stack ``extra_layers`` deeper than ``long``, from two traces of the same step
    that differ by one decoder layer (``short`` has one layer fewer).

    Every stream of ``long`` (baseline storages, the step, the held-out pass) is aligned with ``short``'s; the
    events ``long`` adds are the extra layer's, and they are emitted ``extra_layers`` more times where they occur.
    A free names a storage, so each copy must free the right one: a copy frees what it allocated itself; a
    free of a storage from elsewhere frees the most recent live storage playing the same part (the layer below's
    output in forward, the saved tensors of the layer being differentiated in backward, last in first out);
    parts are matched across layers where the two traces free different storages at matching events. Raises
    :class:`DepthExtensionError` when the traces differ by more than inserted events or a free finds nothing."""
    if extra_layers < 0:
        raise ValueError("extra_layers must be >= 0")
    classes = _Classes()
    ids = itertools.count(1)
    out = DeepStep([], [], [])
    live: dict[int, list[int]] = {}  # class -> live instance ids, in allocation order
    instance: dict[int, tuple[int, int]] = {}  # instance id -> (class, copy sequence)
    own: dict[tuple[int, int], int] = {}  # (serial, copy sequence) -> instance id
    sequence = itertools.count(1)

    streams = [(short.baseline_storages, long.baseline_storages, out.baseline_storages),
               (short.memory_events, long.memory_events, out.memory_events),
               (short.evaluation_events, long.evaluation_events, out.evaluation_events)]
    aligned = []
    # Positions of allocations, for matching parts across the two traces (all streams share one serial space).
    short_alloc_at: dict[int, int] = {}
    long_serial_at: dict[int, int] = {}
    offset = 0
    for short_events, long_events, _ in streams:
        match, inserted = _inserted(short_events, long_events)
        aligned.append((match, inserted))
        for i, (serial, size) in enumerate(short_events):
            if size > 0:
                short_alloc_at.setdefault(serial, offset + i)
        for j, (serial, size) in enumerate(long_events):
            if size > 0 and match[j] is not None:
                long_serial_at.setdefault(offset + match[j], serial)
        offset += len(short_events)
    for (short_events, long_events, _), (match, _) in zip(streams, aligned):
        _roles(short_events, long_events, match, short_alloc_at, long_serial_at, classes)

    def allocate(serial: int, size: int, seq: int, target: list) -> None:
        new = next(ids)
        cls = classes.find(serial)
        live.setdefault(cls, []).append(new)
        instance[new] = (cls, seq)
        own[(serial, seq)] = new
        target.append((new, size))

    def release(serial: int, size: int, seq: int, target: list) -> None:
        chosen = own.get((serial, seq))
        if chosen is None or chosen not in instance:
            candidates = live.get(classes.find(serial), [])
            chosen = next((c for c in reversed(candidates) if instance[c][1] != seq or seq == 0), None)
            if chosen is None:
                raise DepthExtensionError(f"a free of {size} bytes finds no storage playing its part")
        cls, _ = instance.pop(chosen)
        live[cls].remove(chosen)
        target.append((chosen, -size))

    for (_, long_events, target), (_, inserted) in zip(streams, aligned):
        j = 0
        while j < len(long_events):
            if not inserted[j]:
                serial, size = long_events[j]
                (allocate if size > 0 else release)(serial, abs(size), 0, target)
                j += 1
                continue
            end = j
            while end < len(long_events) and inserted[end]:
                end += 1
            for _ in range(1 + extra_layers):  # the traced copy, then the extra ones
                seq = next(sequence)
                for serial, size in long_events[j:end]:
                    (allocate if size > 0 else release)(serial, abs(size), seq, target)
            j = end
    return out


__all__ = ["AllocatorPeaks", "AllocatorRule", "CachingAllocator", "DeepStep", "DepthExtensionError", "ExactAllocator",
           "PoolAllocator", "RULE_CONSTANTS", "extend_depth", "make_allocator", "replay", "replay_trace"]
