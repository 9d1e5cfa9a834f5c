"""``paca train``'s check before it loads any weights: does the planned step fit the device? And ``paca plan``'s own
checks of its flags before any tracing (:func:`check_plan_arguments`).

The same trace as ``paca plan`` (fake tensors, the model's own config.json, the user's method
configs, sequence length and batch size), compared with the device's memory. It warns and names the
levers; it never stops a run (the plan can be wrong, and the user may know better).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

LEVERS = (
    "a smaller --rank, a shorter --seq-len, a smaller --batch-size (with --grad-accum to keep the global batch), "
    "gradient checkpointing, --offload-activations decoder-layers, --quantize nf4 (QPaCA), or --fsdp over more devices"
)


@dataclass
class PreflightResult:
    peak_bytes: int
    device_bytes: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_bytes


def step_tracer(model_path: Path, method: str, configs: list, dtype: torch.dtype, world_size: int = 1, fsdp: bool = False,
                loss_chunk_tokens: int | None = None, gradient_checkpointing: bool = False,
                offload_activations: str | None = None):
    """A :class:`~.planner.MethodTracer` of ``paca train``'s step with these levers, from ``model_path``'s
    config.json alone; it caches traces by shape, so searching many shapes re-builds nothing."""
    from .planner import MethodTracer, PlanSettings
    from .shapes import load_config

    settings = PlanSettings(dtype=dtype, world_size=world_size, fsdp=fsdp, loss_chunk_tokens=loss_chunk_tokens,
                            gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations)
    return MethodTracer(load_config(str(model_path)), method, settings, profiles=(), configs=configs)


def runtime_profiles(device_type: str | None) -> list:
    """The device profiles of ``device_type`` (``cuda``, ``hpu``, a plug-in's): their allocator rule and the runtime's
    own memory are what a step on such a device holds beyond its live bytes. Empty for None."""
    if device_type is None:
        return []
    from devices.profiles import load_profiles

    return [p for p in load_profiles().values() if p.device_type == device_type]


def traced_peak(tracer, seq_len: int, batch_size: int, include_host: bool = False, device_type: str | None = None) -> int:
    """Per-process peak bytes of ``tracer``'s step at one shape. ``include_host``: the device's memory is host
    memory (CPU), so what the method keeps in host memory (MEFT's rows, offloaded activations) counts too.

    ``device_type``: the peak as that device holds it, as ``paca plan``'s ``fits`` decides — the allocator's reserved
    segments plus the runtime's own memory (``device_total``), the largest over that type's profiles (which GPU model
    the run has is not known here; they differ by a workspace or two). None: the live bytes alone."""
    from .planner import device_memory, per_rank_bytes

    measurement = tracer.measure(seq_len, batch_size)
    per_rank = per_rank_bytes(measurement, tracer.settings, tracer.layer_weight_bytes())
    peak = per_rank["peak"]
    profiles = runtime_profiles(device_type)
    if profiles:
        peak = max(device_memory(measurement, per_rank, p, tracer.settings)["device_total"] for p in profiles)
    return peak + (per_rank["host"] if include_host else 0)


def planned_peak(model_path: Path, method: str, configs: list, seq_len: int, batch_size: int, dtype: torch.dtype,
                 world_size: int = 1, fsdp: bool = False, loss_chunk_tokens: int | None = None,
                 gradient_checkpointing: bool = False, offload_activations: str | None = None,
                 include_host: bool = False, device_type: str | None = None) -> int:
    """Peak bytes per process of one ``paca train`` step, traced on fake tensors from ``model_path``'s
    config.json (under FSDP: this rank's shards plus the all-gather buffers); on ``device_type`` as
    :func:`traced_peak` counts it."""
    tracer = step_tracer(model_path, method, configs, dtype, world_size, fsdp, loss_chunk_tokens, gradient_checkpointing,
                         offload_activations)
    return traced_peak(tracer, seq_len, batch_size, include_host, device_type)


def check_before_loading(model_path: Path, method: str, configs: list, seq_len: int, batch_size: int, dtype: torch.dtype,
                         device_bytes: int | None, world_size: int = 1, fsdp: bool = False, loss_chunk_tokens: int | None = None,
                         gradient_checkpointing: bool = False, offload_activations: str | None = None,
                         include_host: bool = False, device_type: str | None = None) -> PreflightResult | None:
    """Warn when the planned peak (on ``device_type``: what the device holds, :func:`traced_peak`) exceeds
    ``device_bytes``; None when it cannot be planned (said at debug level)."""
    if device_bytes is None:
        return None
    try:
        peak = planned_peak(model_path, method, configs, seq_len, batch_size, dtype, world_size, fsdp, loss_chunk_tokens,
                            gradient_checkpointing, offload_activations, include_host, device_type)
    except (PacaConfigError, NotImplementedError, RuntimeError, TypeError, ValueError) as error:
        logger.debug("No memory plan before loading (%s)", error)
        return None
    result = PreflightResult(peak, device_bytes)
    gib = 1 << 30
    if result.fits:
        logger.info("Planned peak %.2f GiB of %.2f GiB on the device (paca plan's trace).", peak / gib, device_bytes / gib)
    else:
        logger.warning(
            "Planned peak %.2f GiB exceeds the device's %.2f GiB (traced before loading, as `paca plan` does): this run will "
            "probably run out of memory. Levers: %s. `paca plan --model %s` shows what fits.",
            peak / gib, device_bytes / gib, LEVERS, model_path,
        )
    return result


def check_plan_arguments(args) -> None:
    """``paca plan`` flags that would plan nothing: an empty ``--methods`` or ``--device-profile`` (``''``, ``','``) would
    print an empty table and exit 0, as if every method had been planned."""
    for flag, value, example in (("--methods", args.methods, "paca,peft-lora"), ("--device-profile", args.device_profile, "h100-80g,cpu")):
        if not [part for part in str(value).split(",") if part.strip()]:
            raise PacaConfigError(f"{flag} {value!r} names nothing to plan: pass one or more, comma-separated (e.g. {flag} {example}), "
                                  "or leave the flag out for its default.")
