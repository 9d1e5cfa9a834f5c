"""Step time from a traced step and a device profile: a roofline per kernel plus launch overhead.

Each op costs ``max(FLOPs / throughput, bytes / bandwidth)`` (the profile's
:meth:`~devices.profiles.DeviceProfile.op_seconds`) plus the profile's per-kernel launch overhead.
Where the profile says its runtime fuses elementwise ops (Gaudi's lazy mode), each run of
consecutive elementwise ops in one phase is one kernel that reads only the inputs produced outside
the run and writes only the run's last outputs. The rule lives in the profile (``fuse_elementwise``,
``fusion_rule``); this module only applies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .tracker import OpRecord, StepTrace


@dataclass
class TimeEstimate:
    step_seconds: float
    compute_seconds: float  # time of kernels whose FLOP term dominates
    memory_seconds: float  # time of kernels whose byte term dominates
    launch_seconds: float
    kernels: int  # after fusion

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


def estimate_time(trace: StepTrace, profile, allow_tf32: bool = False) -> TimeEstimate:
    """The roofline step time of ``trace`` on ``profile`` (a :class:`devices.profiles.DeviceProfile`)."""
    ops = _fused(trace.ops) if profile.fuse_elementwise else trace.ops
    compute = memory = 0.0
    for op in ops:
        dtype = op.dtype if op.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        matmul = op.kind == "matmul"
        seconds = profile.op_seconds(op.flops, op.bytes_moved, dtype, matmul, allow_tf32=allow_tf32)
        if profile.bound(op.flops, op.bytes_moved, dtype, matmul, allow_tf32=allow_tf32) == "compute" and op.flops:
            compute += seconds
        else:
            memory += seconds
    launch = len(ops) * profile.launch_overhead_s
    return TimeEstimate(compute + memory + launch, compute, memory, launch, len(ops))
