"""Device profiles: the figures ``paca plan`` needs to predict memory and step time on hardware we lack.

A profile is data (``devices/profiles.json``), not code, so a figure can be corrected or cited without
touching the planner. Units are SI base units throughout: bytes, FLOP/s, bytes/s, seconds. Every number
carries a source string ("primary: ...", "secondary: ...", "assumption: ...", or for the CPU
"uncalibrated default ..." / "measured by calibrate_cpu ..."); loading fails if one is missing.

The time model is a roofline per kernel: ``max(flops / throughput, bytes / bandwidth)``. The per-kernel
launch cost (:attr:`DeviceProfile.launch_overhead_s`) is *not* part of :meth:`DeviceProfile.op_seconds`:
the caller adds it once per kernel it launches, i.e. once per op on CUDA/CPU eager and once per fused
run of elementwise ops where :attr:`DeviceProfile.fuse_elementwise` is true (Gaudi lazy mode).

Profiles are keyed by registered runtime: a profile's ``device_type`` names the runtime it describes,
and only profiles of registered runtimes are offered. The shipped file holds the built-in devices'; any
runtime can add its own by pointing ``DeviceRuntime.profiles_file`` at a document in the same format
(read when profiles are first asked for), so ``paca plan --device-profile`` covers a plug-in device too.

The ``cpu`` profile stands for "this machine": :func:`calibrate_cpu` measures it and
:func:`save_calibration` stores it in the cache, where :func:`get_profile` finds it. Like the rest of
``devices``, this module imports nothing from ``paca_core`` or ``backends``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping

from ._torch import torch

from .registry import registered_runtimes

logger = logging.getLogger(__name__)

PROFILES_FILE = "profiles.json"
CALIBRATION_FILE = "cpu-profile.json"
CALIBRATE_HINT = "run `paca plan --device-profile cpu --calibrate`"
SCHEMA_VERSION = 1

# The dtype names a profile may hold figures for. "tf32" is float32 run on tensor cores; it is used only
# when the caller says so (PyTorch's default is torch.backends.cuda.matmul.allow_tf32 = False).
DTYPE_KEYS = ("bf16", "fp16", "fp32", "tf32")
_TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
#: What a ``device_type`` looks like (the registry's rule for runtime names).
_DEVICE_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
SOURCE_PREFIXES = ("primary", "secondary", "assumption", "uncalibrated default", "measured")

_SCALAR_FIELDS = ("memory_bytes", "memory_bandwidth", "launch_overhead_s")
_RATE_FIELDS = ("matmul_flops", "vector_flops")
#: The device-memory model (docs/plan.md, "Device memory"): numbers that may be absent, and groups of named
#: byte figures. ``usable_fraction`` and ``runtime_reserve_bytes`` are the older, flat form of
#: ``memory_margin_fraction`` and ``runtime_memory``, still read (a plug-in's profile file may use them).
_MEMORY_SCALARS = ("memory_margin_fraction", "allocator_workspace_copies", "usable_fraction", "runtime_reserve_bytes")
_MEMORY_GROUPS = ("runtime_memory", "allocator_workspaces", "collective_memory")
_REQUIRED = ("description", "device_type", *_SCALAR_FIELDS, "matmul_flops", "fuse_elementwise", "fusion_rule", "sources")
_OPTIONAL = ("vector_flops", "four_bit_types", "allocator", *_MEMORY_SCALARS, *_MEMORY_GROUPS)
#: bitsandbytes' 4-bit weight types (QPaCA, PEFT QLoRA).
FOUR_BIT_TYPES = ("nf4", "fp4")
#: The time model's groups (docs/plan.md, "The time model"): each optional (absent: the plain roofline, no link
#: figures), complete when present. ``efficiency``: achievable matrix throughput by GEMM shape and the fused
#: attention kernel's share of the peak (paca_core/plan/efficiency.py); ``interconnect``: the links collectives
#: run over (paca_core/plan/communication.py).
TIME_MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "efficiency": ("matmul_achievable", "matmul_reference_m", "matmul_reference_n", "matmul_reference_k", "compute_units",
                   "tile", "narrow_tile", "k_overhead", "half_occupancy_tiles_per_unit", "attention"),
    "interconnect": ("devices_per_node", "intra_node_bandwidth", "inter_node_bandwidth", "bus_efficiency",
                     "intra_node_latency_s", "inter_node_latency_s"),
}
#: Keys of those groups that are shares of something, so in (0, 1].
_TIME_MODEL_FRACTIONS = ("efficiency.matmul_achievable", "efficiency.attention", "interconnect.bus_efficiency")
_OPTIONAL = (*_OPTIONAL, *TIME_MODEL_KEYS)

Bound = Literal["compute", "memory"]


class UnknownProfileError(ValueError):
    """An unknown profile name; the message lists the known ones."""


def _dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key in DTYPE_KEYS:
            return key
    elif str(dtype).replace("torch.", "") in _TORCH_DTYPE_NAMES:
        return _TORCH_DTYPE_NAMES[str(dtype).replace("torch.", "")]
    raise ValueError(
        f"no throughput model for dtype {dtype!r}: profiles know torch.bfloat16, torch.float16 and torch.float32 "
        f"(or the names {', '.join(DTYPE_KEYS)})"
    )


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator's capacity and speed figures, with a source for each (see the module docstring)."""

    name: str
    description: str
    device_type: str
    memory_bytes: int
    matmul_flops: Mapping[str, float]
    memory_bandwidth: float
    launch_overhead_s: float
    fuse_elementwise: bool
    fusion_rule: str
    sources: Mapping[str, str]
    vector_flops: Mapping[str, float] = field(default_factory=dict)
    #: The 4-bit weight types bitsandbytes has kernels for on this device (empty: none).
    four_bit_types: tuple[str, ...] = ()
    #: The time model's figures by name (:data:`TIME_MODEL_KEYS`); empty: not modelled for this device.
    efficiency: Mapping[str, float] = field(default_factory=dict)
    interconnect: Mapping[str, float] = field(default_factory=dict)
    #: Share of ``memory_bytes`` a plan leaves unused (the reason is in its source).
    memory_margin_fraction: float | None = None
    #: Device memory the runtime holds outside the framework's allocator, by name (CUDA context...).
    runtime_memory: Mapping[str, float] = field(default_factory=dict)
    #: The framework allocator's rule: ``{"rule": name, constant: value...}`` (paca_core/plan/allocator.py).
    allocator: Mapping[str, Any] = field(default_factory=dict)
    #: Library workspaces allocated through that allocator (cuBLAS), by name, each ``allocator_workspace_copies`` times.
    allocator_workspaces: Mapping[str, float] = field(default_factory=dict)
    allocator_workspace_copies: int | None = None
    #: Collective-library buffers per process when there are several: ``buffer_bytes`` x ``channels`` x ``peers``.
    collective_memory: Mapping[str, float] = field(default_factory=dict)
    #: Older flat form of the margin (``1 - memory_margin_fraction``) and of ``runtime_memory`` (one figure).
    usable_fraction: float | None = None
    runtime_reserve_bytes: int | None = None

    def __post_init__(self) -> None:
        # Read-only views, so a shared profile cannot be edited in place by one caller.
        for name in ("matmul_flops", "vector_flops", "sources", "allocator", *_MEMORY_GROUPS):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "four_bit_types", tuple(self.four_bit_types))
        for name in TIME_MODEL_KEYS:
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        self._validate()

    def supports_4bit(self, kind: str) -> bool:
        """Does bitsandbytes have kernels for this 4-bit weight type on this device?"""
        return kind in self.four_bit_types

    # -- capacity ---------------------------------------------------------------------------------
    def memory_margin(self) -> float:
        """Share of the device memory a plan keeps free (``memory_margin_fraction``, or ``1 - usable_fraction``)."""
        if self.memory_margin_fraction is not None:
            return self.memory_margin_fraction
        return 1.0 - (self.usable_fraction if self.usable_fraction is not None else 1.0)

    def memory_limit(self) -> int:
        """Bytes one process may hold on the device, everything counted (the runtime's own memory, the allocator's
        segments): ``memory_bytes`` less the margin. A plan fits when its device total stays at or below it."""
        return int(self.memory_bytes * (1.0 - self.memory_margin()))

    def runtime_fixed_bytes(self, world_size: int = 1) -> dict[str, int]:
        """Memory the runtime holds outside the framework's allocator, by name; with ``world_size`` > 1 also the
        collective library's buffers (``collective_memory``: buffer x channels x peers)."""
        parts = {name: int(value) for name, value in self.runtime_memory.items()}
        if self.runtime_reserve_bytes is not None:
            parts["runtime_reserve"] = int(self.runtime_reserve_bytes)
        if world_size > 1 and self.collective_memory:
            parts["collective_buffers"] = int(math.prod(self.collective_memory.values()))
        return parts

    def workspace_allocations(self) -> list[int]:
        """Sizes of the library workspaces allocated through the framework's allocator, each copy listed."""
        copies = self.allocator_workspace_copies if self.allocator_workspace_copies is not None else 1
        return [int(size) for size in self.allocator_workspaces.values() for _ in range(int(copies))]

    def usable_bytes(self, world_size: int = 1) -> int:
        """What the framework's allocator may reserve: :meth:`memory_limit` less :meth:`runtime_fixed_bytes`."""
        return self.memory_limit() - sum(self.runtime_fixed_bytes(world_size).values())

    # -- speed ------------------------------------------------------------------------------------
    def matmul_throughput(self, dtype: torch.dtype | str, allow_tf32: bool = False) -> float:
        """Dense matrix FLOP/s for ``dtype``.

        float32 uses the plain FP32 figure, as PyTorch does by default; with ``allow_tf32=True`` it uses
        the profile's "tf32" figure where there is one (else still FP32). There is no other fallback: a
        dtype the profile has no figure for raises ``ValueError``, so a guess never passes as data.
        """
        key = _dtype_key(dtype)
        if key == "fp32" and allow_tf32 and "tf32" in self.matmul_flops:
            key = "tf32"
        try:
            return self.matmul_flops[key]
        except KeyError:
            raise ValueError(
                f"profile {self.name!r} has no {key} matmul figure (it has: {', '.join(self.matmul_flops)})"
            ) from None

    def vector_throughput(self, dtype: torch.dtype | str) -> float:
        """FLOP/s for non-matrix ops: the profile's vector figure for ``dtype``, else its fp32 vector figure,
        else its fp32 matmul figure (on NVIDIA that is the CUDA-core rate). Elementwise ops are almost always
        memory-bound, so these fallbacks rarely decide a prediction."""
        key = _dtype_key(dtype)
        for candidate in (key, "fp32"):
            if candidate in self.vector_flops:
                return self.vector_flops[candidate]
        return self.matmul_throughput(torch.float32)

    def _times(self, flops: float, bytes_moved: float, dtype: torch.dtype | str, matmul: bool, allow_tf32: bool):
        if flops < 0 or bytes_moved < 0:
            raise ValueError(f"flops and bytes_moved must be >= 0, got {flops} and {bytes_moved}")
        rate = self.matmul_throughput(dtype, allow_tf32) if matmul else self.vector_throughput(dtype)
        return flops / rate, bytes_moved / self.memory_bandwidth

    def op_seconds(
        self, flops: float, bytes_moved: float, dtype: torch.dtype | str, matmul: bool, *, allow_tf32: bool = False
    ) -> float:
        """Roofline time of one kernel: ``max(flops / throughput, bytes_moved / memory_bandwidth)``.

        ``bytes_moved`` counts reads plus writes to device memory. The launch overhead is not included:
        the caller adds :attr:`launch_overhead_s` once per kernel (per fused run where fusion applies).
        """
        compute, memory = self._times(flops, bytes_moved, dtype, matmul, allow_tf32)
        return max(compute, memory)

    def bound(
        self, flops: float, bytes_moved: float, dtype: torch.dtype | str, matmul: bool, *, allow_tf32: bool = False
    ) -> Bound:
        """Which roof limits the kernel ("compute" on a tie)."""
        compute, memory = self._times(flops, bytes_moved, dtype, matmul, allow_tf32)
        return "compute" if compute >= memory else "memory"

    # -- data -------------------------------------------------------------------------------------
    def numeric_fields(self) -> Iterator[tuple[str, float]]:
        """Every number in the profile with its dotted name (the key its source is filed under)."""
        for name in _SCALAR_FIELDS:
            yield name, getattr(self, name)
        for name in _MEMORY_SCALARS:
            if getattr(self, name) is not None:
                yield name, getattr(self, name)
        for group in _RATE_FIELDS + _MEMORY_GROUPS:
            for key, value in getattr(self, group).items():
                yield f"{group}.{key}", value
        for key, value in self.allocator.items():
            if key != "rule":
                yield f"allocator.{key}", value
        for group in TIME_MODEL_KEYS:
            for key, value in getattr(self, group).items():
                yield f"{group}.{key}", value

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry for this profile (without its name, which is the entry's key)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        for name in ("matmul_flops", "vector_flops", "sources", "allocator", *_MEMORY_GROUPS):
            data[name] = dict(data[name])
        data = {key: value for key, value in data.items() if value is not None}  # the older memory fields, when unused
        for name in TIME_MODEL_KEYS:
            data[name] = dict(data[name])
        data["four_bit_types"] = list(self.four_bit_types)
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "DeviceProfile":
        """Build and check one JSON entry; a malformed entry raises ``ValueError`` naming the profile."""
        if not isinstance(data, Mapping):
            raise ValueError(f"profile {name!r}: expected an object, got {type(data).__name__}")
        missing = [key for key in _REQUIRED if key not in data]
        unknown = [key for key in data if key not in _REQUIRED and key not in _OPTIONAL]
        if missing or unknown:
            raise ValueError(f"profile {name!r}: missing fields {missing}, unknown fields {unknown}")
        try:
            return cls(name=name, **data)
        except TypeError as exc:  # e.g. a list where an object belongs
            raise ValueError(f"profile {name!r}: {exc}") from None

    def _validate(self) -> None:
        where = f"profile {self.name!r}"
        self._validate_time_model(where)
        if not isinstance(self.device_type, str) or not _DEVICE_TYPE.match(self.device_type):
            raise ValueError(f"{where}: device_type {self.device_type!r} is not a device type name (e.g. 'cuda')")
        if not isinstance(self.fuse_elementwise, bool):
            raise ValueError(f"{where}: fuse_elementwise must be true or false")
        unknown_types = [kind for kind in self.four_bit_types if kind not in FOUR_BIT_TYPES]
        if unknown_types:
            raise ValueError(f"{where}: four_bit_types has unknown types {unknown_types} (known: {FOUR_BIT_TYPES})")
        if self.four_bit_types and "four_bit_types" not in self.sources:
            raise ValueError(f"{where}: four_bit_types needs an entry in 'sources'")
        for group in _RATE_FIELDS:
            bad = [key for key in getattr(self, group) if key not in DTYPE_KEYS]
            if bad:
                raise ValueError(f"{where}: {group} has unknown dtype names {bad} (known: {DTYPE_KEYS})")
        for name, older in (("memory_margin_fraction", "usable_fraction"), ("runtime_memory", "runtime_reserve_bytes")):
            given = [key for key in (name, older) if getattr(self, key) not in (None, {})]
            if len(given) != 1:
                raise ValueError(f"{where}: give {name} (or its older form {older}), exactly one of them")
        rule = self.allocator.get("rule") if self.allocator else "exact"
        if not isinstance(rule, str) or not rule:
            raise ValueError(f"{where}: allocator needs a 'rule' name (e.g. 'cuda_caching'; see paca_core/plan/allocator.py)")
        may_be_zero = ("runtime_reserve_bytes", "memory_margin_fraction", "runtime_memory.", "allocator_workspaces.")
        for key, value in self.numeric_fields():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and not key.startswith(may_be_zero)):
                raise ValueError(f"{where}: {key} must be positive, got {value!r}")
            source = self.sources.get(key)
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"{where}: {key} has no source (add it to 'sources')")
        known = {key for key, _ in self.numeric_fields()} | {"fuse_elementwise", "fusion_rule", "description", "four_bit_types",
                                                             "allocator"}
        stray = [key for key in self.sources if key not in known]
        if stray:
            raise ValueError(f"{where}: sources name no field of the profile: {stray}")
        if self.usable_fraction is not None and not 0 < self.usable_fraction <= 1:
            raise ValueError(f"{where}: usable_fraction must be in (0, 1], got {self.usable_fraction}")
        if not 0 <= self.memory_margin() < 1:
            raise ValueError(f"{where}: memory_margin_fraction must be in [0, 1), got {self.memory_margin()}")
        if self.usable_bytes() <= 0:
            raise ValueError(f"{where}: usable_bytes() is not positive; check memory_bytes, the margin and runtime_memory")


    def _validate_time_model(self, where: str) -> None:
        """Each time-model group is absent or complete, with known keys only and its shares in (0, 1]; the numbers'
        sources and signs are checked with every other number's."""
        for group, keys in TIME_MODEL_KEYS.items():
            given = getattr(self, group)
            if not isinstance(given, Mapping):
                raise ValueError(f"{where}: {group} must be an object of named numbers")
            unknown = sorted(set(given) - set(keys))
            missing = [key for key in keys if key not in given] if given else []
            if unknown or missing:
                raise ValueError(f"{where}: {group} has unknown keys {unknown} and lacks {missing} (it needs all of {list(keys)})")
            for key in keys:
                value = given.get(key)
                if f"{group}.{key}" in _TIME_MODEL_FRACTIONS and isinstance(value, (int, float)) and not 0 < value <= 1:
                    raise ValueError(f"{where}: {group}.{key} is a share and must be in (0, 1], got {value!r}")


# -- loading ----------------------------------------------------------------------------------------
def _parse(document: Mapping[str, Any], origin: str) -> dict[str, DeviceProfile]:
    if not isinstance(document, Mapping) or not isinstance(document.get("profiles"), Mapping):
        raise ValueError(f"{origin}: expected an object with a 'profiles' object")
    if document.get("version") != SCHEMA_VERSION:
        raise ValueError(f"{origin}: version {document.get('version')!r}, expected {SCHEMA_VERSION}")
    return {name: DeviceProfile.from_dict(name, entry) for name, entry in document["profiles"].items()}


@lru_cache(maxsize=1)
def _shipped() -> Mapping[str, DeviceProfile]:
    text = resources.files(__package__).joinpath(PROFILES_FILE).read_text(encoding="utf-8")
    return MappingProxyType(_parse(json.loads(text), f"{__package__}/{PROFILES_FILE}"))


#: (device type, file) -> that runtime's profiles, read once per file.
_RUNTIME_FILES: dict[tuple[str, str], Mapping[str, DeviceProfile]] = {}
_WARNED: set[str] = set()


def _read_runtime_profiles(device_type: str, source: Any) -> Mapping[str, DeviceProfile]:
    """The profiles in a runtime's ``profiles_file``; each must describe that runtime's device type."""
    key = (device_type, str(source))
    if key not in _RUNTIME_FILES:
        path = Path(source) if isinstance(source, (str, os.PathLike)) else source
        profiles = _parse(json.loads(path.read_text(encoding="utf-8")), str(source))
        strays = sorted(name for name, profile in profiles.items() if profile.device_type != device_type)
        if strays:
            raise ValueError(f"{source}: profiles {strays} do not describe {device_type!r}, the runtime that points to this file")
        _RUNTIME_FILES[key] = MappingProxyType(profiles)
    return _RUNTIME_FILES[key]


def _registered_profiles() -> tuple[dict[str, DeviceProfile], list[str]]:
    """Every profile of a registered runtime (shipped first, then each runtime's own file), and what
    could not be read (a broken plug-in file must not take the other profiles down with it)."""
    runtimes = registered_runtimes()
    served = {runtime.name for runtime in runtimes}
    profiles = {name: p for name, p in _shipped().items() if p.device_type in served}
    problems = []
    for runtime in runtimes:
        if runtime.profiles_file is None:
            continue
        try:
            own = _read_runtime_profiles(runtime.name, runtime.profiles_file)
        except (OSError, ValueError, TypeError) as error:
            problems.append(f"the {runtime.name} runtime's profiles ({error})")
            continue
        for name, profile in own.items():
            if name in profiles:
                problems.append(f"the {runtime.name} runtime's profile {name!r} (the name is taken)")
            else:
                profiles[name] = profile
    for problem in problems:
        if problem not in _WARNED:
            _WARNED.add(problem)
            logger.warning("device profiles: left out %s", problem)
    return profiles, problems


def load_profiles() -> dict[str, DeviceProfile]:
    """The profiles of the registered runtimes: ``devices/profiles.json``'s (the ``cpu`` entry holds
    uncalibrated defaults), then each runtime's ``profiles_file``."""
    return _registered_profiles()[0]


def default_calibration_path() -> Path:
    """Where the CPU calibration lives: ``$PACA_CACHE_DIR``, else ``$XDG_CACHE_HOME/paca-hal``, else
    ``~/.cache/paca-hal`` (the same rule as ``paca_core.files.assets.cache_dir``, repeated here because
    ``devices`` must not import ``paca_core``), then ``cpu-profile.json``."""
    if os.environ.get("PACA_CACHE_DIR"):
        root = Path(os.environ["PACA_CACHE_DIR"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "paca-hal"
    else:
        root = Path.home() / ".cache" / "paca-hal"
    return root / CALIBRATION_FILE


def load_calibration(path: Path) -> DeviceProfile:
    """Read a file written by :func:`save_calibration`."""
    profiles = _parse(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
    if "cpu" not in profiles:
        raise ValueError(f"{path}: holds no 'cpu' profile")
    return profiles["cpu"]


def _with_capabilities(calibrated: DeviceProfile, shipped: DeviceProfile) -> DeviceProfile:
    """A calibration measures speeds; what the device supports (its 4-bit kernels) stays the shipped profile's."""
    sources = dict(calibrated.sources)
    if shipped.four_bit_types:
        sources["four_bit_types"] = shipped.sources["four_bit_types"]
    return dataclasses.replace(calibrated, four_bit_types=shipped.four_bit_types, sources=sources)


def get_profile(name: str, calibrated_cache: Path | None = None) -> DeviceProfile:
    """The profile called ``name`` (case-insensitive), among the registered runtimes' (:func:`load_profiles`).

    For ``cpu``, a calibration file (``calibrated_cache``, default :func:`default_calibration_path`)
    replaces the shipped defaults when it exists and reads cleanly; an unreadable one is ignored with a
    warning, since the defaults still give an answer.
    """
    profiles, problems = _registered_profiles()
    key = name.strip().lower()
    if key not in profiles:
        left_out = f" (left out: {'; '.join(problems)})" if problems else ""
        raise UnknownProfileError(f"unknown device profile {name!r}; known profiles: {', '.join(sorted(profiles))}{left_out}")
    if key == "cpu":
        path = Path(calibrated_cache) if calibrated_cache is not None else default_calibration_path()
        if path.is_file():
            try:
                return _with_capabilities(load_calibration(path), profiles[key])
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("ignoring CPU calibration %s (%s); using uncalibrated defaults", path, exc)
        else:
            logger.info("no CPU calibration at %s: using uncalibrated defaults; %s", path, CALIBRATE_HINT)
    return profiles[key]


def save_calibration(profile: DeviceProfile, path: Path | None = None) -> Path:
    """Write ``profile`` as the CPU calibration, atomically (temporary file + ``os.replace``), so a reader
    never sees half a file. Returns the path written."""
    path = Path(path) if path is not None else default_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"version": SCHEMA_VERSION, "profiles": {"cpu": profile.to_dict()}}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- CPU calibration --------------------------------------------------------------------------------
def _best_time(fn: Callable[[], object], budget_s: float, max_reps: int = 100) -> float:
    """Best wall time of ``fn`` after one warm-up call; at least one timed call, more while the budget lasts."""
    fn()
    best, start, reps = math.inf, time.perf_counter(), 0
    while reps == 0 or (reps < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return max(best, 1e-9)


def _measure_matmul(dtype: torch.dtype, budget_s: float) -> float:
    """Best FLOP/s of ``torch.mm`` on n x n matrices, growing n while the next size still fits the budget."""
    deadline = time.perf_counter() + budget_s
    rate = 0.0
    for n in (256, 512, 1024, 2048):
        remaining = deadline - time.perf_counter()
        flops = 2.0 * n**3
        if rate and 3 * flops / rate > remaining:  # warm-up + two timed runs would overrun
            break
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        rate = max(rate, flops / _best_time(lambda: torch.mm(a, b), remaining / 2))
    return rate


def _measure_bandwidth(budget_s: float) -> float:
    """Bytes/s of a large ``dst.copy_(src)`` (read + write counted). Buffers start at 64 MiB, beyond most
    last-level caches, and grow to 256 MiB while the budget allows; the largest size measured counts."""
    deadline = time.perf_counter() + budget_s
    result = 0.0
    for mib in (64, 128, 256):
        remaining = deadline - time.perf_counter()
        moved = 2.0 * mib * 2**20
        if result and 3 * moved / result > remaining:
            break
        src = torch.ones(mib * 2**18, dtype=torch.float32)
        dst = torch.zeros_like(src)  # touch the pages before timing
        result = moved / _best_time(lambda: dst.copy_(src), remaining / 2)
        del src, dst
    return result


def _measure_launch(budget_s: float, batch: int = 200) -> float:
    """Seconds per eager op, from ``torch.add`` on one-element tensors (pure dispatch cost)."""
    a, b = torch.ones(1), torch.ones(1)

    def run() -> None:
        for _ in range(batch):
            torch.add(a, b)

    return _best_time(run, budget_s) / batch


def _total_memory() -> tuple[int, str]:
    try:
        import psutil

        return int(psutil.virtual_memory().total), "psutil.virtual_memory().total"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemTotal"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "sysconf SC_PHYS_PAGES"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measures_this_machine(name: str) -> bool:
    """Whether the profile ``name`` stands for the machine running the planner (calibrated by :func:`calibrate_cpu`)."""
    return name.lower() == "cpu"


def calibrate_cpu(seconds: float = 3.0, threads: int | None = None) -> DeviceProfile:
    """Measure this CPU and return it as the ``cpu`` profile (not saved: see :func:`save_calibration`).

    Matmul FLOP/s per dtype (bf16/fp16/fp32, ``torch.mm``, best of repeats), memory bandwidth (large
    tensor copy), per-op launch overhead (tiny ``torch.add``) and total RAM. ``seconds`` bounds the timed
    work (the allocation of the test tensors comes on top); ``threads`` sets torch's intra-op thread count
    for the measurement and is restored afterwards.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if load is not None and load > (os.cpu_count() or 1) - used_threads + 0.5:
            # Intra-op threads wait on each other at every barrier; a preempted one stalls the rest.
            logger.warning(
                "calibrate_cpu: the machine is busy (load %.2f on %s CPUs); the figures will understate an idle "
                "machine, especially with %d threads", load, os.cpu_count(), used_threads,
            )
        stamp = (
            f"measured by calibrate_cpu on {_cpu_model()}, torch {torch.__version__}, {used_threads} threads, "
            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
            + (f", load average {load:.2f}" if load is not None else "")
        )
        matmul: dict[str, float] = {}
        sources: dict[str, str] = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # 60% of the budget
            key = _dtype_key(dtype)
            try:
                matmul[key] = _measure_matmul(dtype, 0.2 * seconds)
                sources[f"matmul_flops.{key}"] = f"{stamp}: best torch.mm FLOP/s over n x n sizes up to 2048"
            except RuntimeError as exc:  # a dtype this CPU build cannot multiply: leave it out
                logger.warning("calibrate_cpu: no %s matmul on this CPU (%s)", key, exc)
        bandwidth = _measure_bandwidth(0.3 * seconds)
        launch = _measure_launch(0.1 * seconds)
        memory, memory_how = _total_memory()
    finally:
        torch.set_num_threads(previous_threads)

    defaults = _shipped()["cpu"]
    sources.update(
        memory_bytes=f"{stamp}: {memory_how}",
        **{key: source.replace("uncalibrated default; run `paca plan --device-profile cpu --calibrate`. ", "")
           for key, source in defaults.sources.items() if key.startswith(("memory_margin", "runtime_memory", "runtime_reserve",
                                                                          "usable_fraction"))},
        memory_bandwidth=f"{stamp}: best dst.copy_(src) of a 64-256 MiB float32 tensor, read + write bytes",
        launch_overhead_s=f"{stamp}: best per-op time of torch.add on one-element tensors",
        fuse_elementwise="assumption: eager CPU execution does not fuse",
    )
    profile = dataclasses.replace(
        defaults,
        description=f"this machine: {_cpu_model()}, {used_threads} threads (calibrated)",
        memory_bytes=memory,
        matmul_flops=matmul,
        vector_flops={},
        memory_bandwidth=bandwidth,
        launch_overhead_s=launch,
        sources={**sources, **{k: v for k, v in defaults.sources.items() if k == "four_bit_types"}},
    )
    logger.info(
        "calibrated CPU: fp32 %.3g, bf16 %s FLOP/s, %.3g B/s, %.3g s per op",
        matmul.get("fp32", float("nan")),
        f"{matmul['bf16']:.3g}" if "bf16" in matmul else "n/a",
        bandwidth,
        launch,
    )
    return profile
