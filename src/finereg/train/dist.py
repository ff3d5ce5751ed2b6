"""Distributed helpers for the engine: set-up from ``torchrun``'s environment, rank queries, broadcasts.

``torchrun --nproc_per_node=N -m finereg fit ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the engine
then joins a process group (NCCL on GPU, gloo on CPU). A process group that already exists (for example made by
``torch.multiprocessing.spawn`` in a test) is used as it is.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._checks import FineregError

__all__ = [
    "DistInfo",
    "setup_distributed",
    "is_distributed",
    "world_size",
    "rank",
    "barrier",
    "broadcast_tensor",
    "broadcast_object",
    "all_reduce_sum",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True inside an initialized process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise FineregError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FineregError(f"--device {device!r} asks for CUDA but no GPU is visible; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment (or keep the one already made).

    Returns this process's :class:`DistInfo`. Without ``WORLD_SIZE`` > 1 and without a process group this is
    a single process on ``device``.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
        dev = _pick_device(device, local_rank if "LOCAL_RANK" in os.environ else r)
        return DistInfo(r, w, local_rank, dev)
    dev = _pick_device(device, local_rank)
    if env_world > 1:
        if not dist.is_available():
            raise FineregError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(0, 1, 0, dev)


def shutdown(clean: bool = True) -> None:
    """Leave the process group, if any, cleanly (the command line calls this on exit under ``torchrun``).

    A ``clean`` exit first meets the other ranks at a barrier: tearing gloo down while a peer still talks to it
    aborts the process. After an error the ranks may not all get here, so the group is destroyed at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
            _leave_together()
    finally:
        dist.destroy_process_group()


_leavings = itertools.count()


def _leave_together() -> None:
    """Return once every rank has left the last collective, meeting through the group's store, not its links.

    A barrier alone is not enough: a rank can return from it while a peer's last receive is still in flight, and
    destroying the group then closes the link under that receive, which aborts the peer (gloo issue 155; seen
    here as a SIGABRT of one rank under load).
    """
    store = dist.distributed_c10d._get_default_store()
    n = next(_leavings)
    store.set(f"finereg/leave{n}/{dist.get_rank()}", "1")
    store.wait([f"finereg/leave{n}/{r}" for r in range(dist.get_world_size())])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` of rank ``src`` on every rank (in place; returns ``t``). Shapes must agree across ranks."""
    if is_distributed():
        dist.broadcast(t, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A picklable object of rank ``src`` on every rank (tensors come back on the CPU)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place; returns ``t``)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
