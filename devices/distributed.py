"""Multi-process launches (torchrun, accelerate launch, mpirun with the env:// variables): each
process's device and the collective backend for the device type (gloo, nccl, hccl)."""
from __future__ import annotations

import logging
import os

from ._torch import torch

from .registry import resolve_device, runtime_for

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Processes in this launch according to the launcher's environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes of this launch on this machine (``LOCAL_WORLD_SIZE``, set by torchrun; 1 when not
    launched): they share the host's memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def world_size() -> int:
    """Processes in the initialised process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(spec: str | torch.device | None = None) -> tuple[torch.device, int, int]:
    """Resolve this process's device and, under a multi-process launch, join the process group.

    Returns ``(device, rank, world_size)``; without a launcher that is ``(device, 0, 1)``.
    """
    device = resolve_device(spec)
    world = launched_world_size()
    if world <= 1:
        return device, 0, 1
    import torch.distributed as dist

    runtime = runtime_for(device)
    device = runtime.rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    runtime.prepare_distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend=runtime.distributed_backend)
    logger.info("Process %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, runtime.distributed_backend)
    return device, dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group cleanly at the end of a run: wait for every process, then destroy it.
    A process that exits with the group alive can abort in teardown (gloo threads: "terminate called
    without an active exception") after its work is done. A no-op without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    _HOST_GROUP.clear()
    dist.destroy_process_group()


def device_mesh(device: torch.device | str):
    """A one-dimensional device mesh over every process (what FSDP2 shards across)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


_HOST_GROUP: list = []


def host_process_group():
    """The process group for collectives on host (CPU) tensors: the default group when it runs gloo,
    otherwise a gloo group over the same processes, made on first use (every process must call this
    at the same point, as with any collective)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None  # the default group
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]
