"""A gloo process group for tests that spawn CPU processes."""

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(tmp: str, rank: int, world: int):
    """Join a gloo group through a file in ``tmp``; on exit all ranks meet at a barrier before the group is torn
    down (tearing down while a peer still talks to gloo aborts the process: "terminate called without an active
    exception")."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
