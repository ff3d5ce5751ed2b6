"""Distributed helpers: device choice, single-process fallbacks, and broadcasts / reductions across 2 gloo
processes."""

import pytest
import torch
import torch.multiprocessing as mp

from finereg._checks import FineregError
from finereg.train import dist as fdist
from tests._dist import gloo_group


def test_single_process_is_a_no_op_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = fdist.setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    t = torch.arange(3.0)
    assert fdist.broadcast_tensor(t) is t and fdist.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert fdist.broadcast_object({"a": 1}) == {"a": 1} and fdist.rank() == 0 and fdist.world_size() == 1
    fdist.barrier()
    fdist.shutdown()  # nothing to leave


@pytest.mark.parametrize(
    "device,match",
    [("tpu", "unknown device 'tpu': use auto, cpu, cuda or cuda:N"), ("cuda:0", "no GPU is visible")],
)
def test_bad_devices_are_clear_errors(device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(FineregError, match=match):
        fdist.setup_distributed(device)


def _worker(rank: int, tmp: str) -> None:
    with gloo_group(tmp, rank, 2):
        info = fdist.setup_distributed("cpu")  # the group made here is used as it is
        assert (info.rank, info.world_size, info.distributed) == (rank, 2, True)
        t = torch.full((3,), float(rank + 1))
        fdist.broadcast_tensor(t, src=1)
        obj = fdist.broadcast_object({"from": rank} if rank == 0 else None)
        s = fdist.all_reduce_sum(torch.tensor([rank + 1.0]))
        torch.save({"t": t, "obj": obj, "sum": s}, f"{tmp}/out{rank}.pt")


@pytest.mark.distributed
def test_broadcasts_and_sums_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"out{rank}.pt", weights_only=True)
        assert torch.equal(out["t"], torch.full((3,), 2.0))  # rank 1's tensor everywhere
        assert out["obj"] == {"from": 0} and out["sum"].item() == 3.0
