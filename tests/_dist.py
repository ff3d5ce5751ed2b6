"""A gloo process group for tests that spawn CPU processes."""

import contextlib

import torch.distributed as dist

from finereg.train.dist import shutdown


@contextlib.contextmanager
def gloo_group(tmp: str, rank: int, world: int):
    """Join a gloo group through a file in ``tmp``; leave it as the command line does
    (:func:`finereg.train.dist.shutdown`: after a clean exit every rank leaves together)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    clean = False
    try:
        yield
        clean = True
    finally:
        shutdown(clean)
