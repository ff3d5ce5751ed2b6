"""DistributedDataParallel: two CPU processes (gloo) take the same steps as one process with the same global batch."""

import pytest
import torch
import torch.multiprocessing as mp

from finereg.train.checkpoint import load_checkpoint
from finereg.train.loop import FitConfig, fit
from tests._dist import gloo_group

pytestmark = pytest.mark.distributed

WORLD = 2


def _worker(rank: int, tmp: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    with gloo_group(tmp, rank, WORLD):
        res = fit(FitConfig(**cfg), log=lambda m: None)
        torch.save(res.net.state_dict(), f"{tmp}/net{rank}.pt")


def _run_both(tmp_path, **kw):
    cfg = dict(epochs=2, iters_per_epoch=3, batch_size=16, sample_rate=30, progress=False, tensorboard=False, **kw)
    single = fit(FitConfig(out=str(tmp_path / "single"), **cfg), log=lambda m: None)
    tmp = str(tmp_path)
    mp.spawn(_worker, args=(tmp, {**cfg, "out": str(tmp_path / "ddp")}), nprocs=WORLD, join=True)
    nets = [torch.load(f"{tmp}/net{r}.pt", weights_only=True) for r in range(WORLD)]
    return single, nets, load_checkpoint(tmp_path / "ddp")


def _assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize(
    "method", ["erm", "l2sp+delta-attention+bss", "lwf+co-tuning", "bi-tuning", "ftp+bss", "lp-ft+tpgm"]
)
def test_two_processes_equal_one_process(tmp_path, method):
    """Per-sample losses average over processes; DELTA's batch sum is scaled by the process count, BSS gathers the
    features of all processes, the set-up products (attention, LwF targets, relationship) come from rank 0 and
    Bi-Tuning's queues take the keys of all processes in rank order, the optimizer wrappers see the averaged
    gradients, LP-FT's probe comes from rank 0 and every rank learns TPGM's radii on the same validation batches:
    every method takes the single-process steps."""
    single, nets, ck = _run_both(tmp_path, method=method)
    _assert_close(nets[0], nets[1], rtol=0, atol=0)  # the ranks hold the same weights
    _assert_close(single.net.state_dict(), nets[0], rtol=1e-5, atol=1e-6)
    _assert_close(single.net.state_dict(), ck["net"], rtol=1e-5, atol=1e-6)  # rank 0 wrote the checkpoint
    # metrics are over all processes: same training loss and accuracy as one process
    for a, b in zip(single.history, ck["history"]):
        assert a.keys() == b.keys()
        for k in a:
            if k != "epoch_seconds":
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    if method == "bi-tuning":  # the queues (model state) match too
        single_ck = load_checkpoint(tmp_path / "single")
        _assert_close(single_ck["model"], ck["model"], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "ddp" / "rank1").exists()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )


def test_torchrun_command_line(tmp_path):
    """The documented command, ``torchrun --nproc_per_node=2 -m finereg fit ...``, as a user runs it: exits 0, leaves
    the process group cleanly, and ends with the weights of a one-process run of the same command."""
    import os
    import socket
    import subprocess
    import sys

    args = [
        "fit",
        "--method",
        "l2sp+bss",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "3",
        "--batch-size",
        "16",
        "--sample-rate",
        "30",
        "--no-progress",
        "--no-tensorboard",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "finereg",
            *args,
            "--out",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "done: top-1" in ddp.stdout and ddp.stdout.count("done: top-1") == 1  # rank 0 alone reports
    one = subprocess.run(
        [sys.executable, "-m", "finereg", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_close(
        load_checkpoint(tmp_path / "one")["net"], load_checkpoint(tmp_path / "ddp")["net"], rtol=1e-5, atol=1e-6
    )
