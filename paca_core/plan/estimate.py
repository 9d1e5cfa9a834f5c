"""Step time from a traced step and a device profile: a roofline per kernel plus launch overhead.

Each op costs ``max(FLOPs / throughput, bytes / bandwidth)`` plus the profile's per-kernel launch overhead.
The throughput of a GEMM is the dense peak times the share its shape reaches (:func:`.efficiency.gemm_efficiency`);
a fused attention kernel is charged the FLOPs it computes (:func:`.efficiency.causal_fraction`: about half under a
causal mask) at its own share of the peak; other ops use the vector rate. Ops without a recorded shape (hand-built
traces) keep the plain roofline of :meth:`~devices.profiles.DeviceProfile.op_seconds`.
Where the profile says its runtime fuses elementwise ops (Gaudi's lazy mode), each run of
consecutive elementwise ops in one phase is one kernel that reads only the inputs produced outside
the run and writes only the run's last outputs. The rule lives in the profile (``fuse_elementwise``,
``fusion_rule``); this module only applies it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from .efficiency import attention_efficiency, causal_fraction, gemm_efficiency
from .tracker import OpRecord, StepTrace


@dataclass
class TimeEstimate:
    step_seconds: float
    compute_seconds: float  # time of kernels whose FLOP term dominates
    memory_seconds: float  # time of kernels whose byte term dominates
    launch_seconds: float
    kernels: int  # after fusion
    #: FLOPs the kernels compute (the trace's count less what causal attention skips).
    charged_flops: float = 0.0
    #: Seconds (roofline plus launches) and kernels per phase (forward, backward, optimizer, column_write): what
    #: communication overlaps with, and what a sharded optimizer divides (:mod:`.communication`).
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_kernels: dict[str, int] = field(default_factory=dict)

    @property
    def bound(self) -> str:
        """What the step spends most of its time on: compute, memory bandwidth, or launch overhead."""
        parts = {"compute": self.compute_seconds, "memory bandwidth": self.memory_seconds, "launch overhead": self.launch_seconds}
        return max(parts, key=parts.get)

    def as_dict(self) -> dict:
        return {
            "step_seconds": self.step_seconds,
            "compute_seconds": self.compute_seconds,
            "memory_seconds": self.memory_seconds,
            "launch_seconds": self.launch_seconds,
            "kernels": self.kernels,
            "bound": self.bound,
            "charged_flops": self.charged_flops,
            "phase_seconds": dict(self.phase_seconds),
            "phase_kernels": dict(self.phase_kernels),
        }


def _fused(ops: Iterable[OpRecord]) -> list[OpRecord]:
    """Merge each run of consecutive elementwise ops of one phase into one kernel record."""
    out: list[OpRecord] = []
    run: list[OpRecord] = []

    def close() -> None:
        if not run:
            return
        if len(run) == 1:
            out.append(run[0])
        else:
            # External reads: each op's inputs not produced by an earlier op of the run (bytes in proportion to
            # those inputs). Only earlier outputs count: an in-place op's input is read from memory, and a later
            # op's output may reuse the id of a storage freed inside the run.
            produced: set[int] = set()
            read = 0
            for op in run:
                external = [sid for sid in op.inputs if sid not in produced]
                if op.inputs:
                    read += op.bytes_read * len(external) // len(op.inputs)
                produced.update(op.outputs)
            last = run[-1]
            out.append(OpRecord("fused_elementwise", last.phase, "elementwise", sum(op.flops for op in run), read,
                                last.bytes_written, last.dtype, (), last.outputs))
        run.clear()

    for op in ops:
        if op.kind == "elementwise" and (not run or run[-1].phase == op.phase):
            run.append(op)
            continue
        close()
        if op.kind == "elementwise":
            run.append(op)
        else:
            out.append(op)
    close()
    return out


def kernel_times(op: OpRecord, profile, allow_tf32: bool = False) -> tuple[float, float, float]:
    """(FLOPs charged, compute seconds, memory seconds) of one kernel on ``profile``, before its launch."""
    dtype = op.dtype if op.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    flops = float(op.flops)
    if op.kind != "matmul":
        rate = profile.vector_throughput(dtype)
    else:
        rate = profile.matmul_throughput(dtype, allow_tf32)
        if op.attention is not None:
            _, q_len, kv_len, _, causal = op.attention
            flops *= causal_fraction(q_len, kv_len, causal)
            rate *= attention_efficiency(profile)
        elif op.gemm is not None:
            rate *= gemm_efficiency(profile, *op.gemm, dtype=dtype, allow_tf32=allow_tf32)
    return flops, flops / rate, op.bytes_moved / profile.memory_bandwidth


def estimate_time(trace: StepTrace, profile, allow_tf32: bool = False) -> TimeEstimate:
    """The step time of ``trace`` on ``profile`` (a :class:`devices.profiles.DeviceProfile`): each kernel's
    roofline (:func:`kernel_times`) plus one launch overhead per kernel."""
    ops = _fused(trace.ops) if profile.fuse_elementwise else trace.ops
    compute = memory = charged = 0.0
    phase_seconds: dict[str, float] = {}
    phase_kernels: dict[str, int] = {}
    for op in ops:
        flops, compute_s, memory_s = kernel_times(op, profile, allow_tf32)
        charged += flops
        if compute_s >= memory_s and flops:
            compute += compute_s
        else:
            memory += memory_s
        phase_seconds[op.phase] = phase_seconds.get(op.phase, 0.0) + max(compute_s, memory_s) + profile.launch_overhead_s
        phase_kernels[op.phase] = phase_kernels.get(op.phase, 0) + 1
    launch = len(ops) * profile.launch_overhead_s
    return TimeEstimate(compute + memory + launch, compute, memory, launch, len(ops), charged, phase_seconds, phase_kernels)
