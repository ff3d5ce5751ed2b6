"""The training loop: metrics, checkpoints, exact resume, Ctrl-C, protection of earlier runs, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finereg._checks import FineregError
from finereg.train.checkpoint import LAST, PREV, CheckpointError, load_checkpoint
from finereg.train.cli import main
from finereg.train.loop import FitConfig, evaluate, fit, load_trained
from finereg.train.methods import method_names
from finereg.train.run_dir import RunDirError
from tests.train._util import digest, image_folder

QUIET = dict(log=lambda m: None)

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--no-tensorboard", "--sample-rate", "30"]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rows(history):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history]


def test_fit_records_metrics_and_checkpoints(tmp_path, tiny):
    res = fit(tiny(tmp_path, tensorboard=True), **QUIET)
    run = Path(res.run_dir)
    assert res.epochs_done == 2 and not res.interrupted
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"lr", "train_ce", "train_loss", "train_acc", "test_top1", "test_mean_class_acc", "test_loss"} <= set(
        rows[0]
    )
    jl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert jl == res.history
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / LAST).exists() and (run / PREV).exists() and (run / "config.json").exists()
    assert load_checkpoint(run)["epoch"] == 2 and load_checkpoint(run / PREV)["epoch"] == 1
    # the logged accuracy is the network's accuracy on the held-out split
    from finereg.train.datasets import load_data

    val = load_data("digits").test
    again = evaluate(res.net, val, 64, torch.device("cpu"), 5)
    assert again["test_top1"] == pytest.approx(res.final["test_top1"])
    with torch.no_grad():
        pred = torch.cat([res.net(b.x).argmax(1) for b in val.eval_batches(64, torch.device("cpu"))])
    assert res.final["test_top1"] == pytest.approx(100.0 * float((pred == val.labels).double().mean()))
    # the lr each epoch trained with followed the step schedule: head lr 0.05, x0.1 after round(0.6 * 2) = 1 epoch
    assert [r["lr"] for r in res.history] == pytest.approx([0.05, 0.005])
    trained = load_trained(run)
    x = next(val.eval_batches(8, torch.device("cpu"))).x
    assert torch.equal(trained(x), res.net.eval()(x))


@pytest.mark.parametrize("method", method_names("tllib"))  # the robust methods: tests/train/test_robust_recipes.py
def test_resume_mid_epoch_gives_the_uninterrupted_weights(tmp_path, tiny, method):
    """Set-up products (LwF's targets, Co-Tuning's relationship, channel attention), Bi-Tuning's queues and
    momentum encoder, and every optimizer state come back from a mid-epoch checkpoint."""
    full = fit(tiny(tmp_path / "a", method=method), **QUIET)

    def stop(info):
        if info.epoch == 0 and info.step == 2:
            raise KeyboardInterrupt

    part = fit(tiny(tmp_path / "b", method=method), on_step=stop, **QUIET)
    assert part.interrupted and part.epochs_done == 0
    ck = load_checkpoint(part.run_dir)
    assert (ck["epoch"], ck["step"]) == (0, 2) and ck["rng"] is not None
    resumed = fit(FitConfig(resume=str(part.run_dir), progress=False), **QUIET)
    assert not resumed.interrupted and resumed.epochs_done == 2
    assert _same_weights(full.net, resumed.net)
    assert _rows(full.history) == _rows(resumed.history)
    a, b = load_checkpoint(full.run_dir), load_checkpoint(resumed.run_dir)
    assert all(
        torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
        for k in a["optimizer"]["state"]
    )
    assert a["net"].keys() == b["net"].keys() and all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_resume_after_an_epoch_and_with_more_epochs(tmp_path, tiny):
    full = fit(tiny(tmp_path / "a", epochs=3, lr_steps=[2]), **QUIET)
    first = fit(tiny(tmp_path / "b", epochs=1, lr_steps=[2]), **QUIET)
    assert first.epochs_done == 1
    more = fit(FitConfig(out=str(first.run_dir), resume=True, epochs=3, progress=False), **QUIET)
    assert _same_weights(full.net, more.net) and _rows(full.history) == _rows(more.history)


def test_a_finished_run_is_not_overwritten(tmp_path, tiny):
    cfg = tiny(tmp_path)
    fit(cfg, **QUIET)
    before = (Path(cfg.out) / LAST).read_bytes()
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        fit(cfg, **QUIET)
    assert (Path(cfg.out) / LAST).read_bytes() == before
    res = fit(FitConfig(**{**cfg.__dict__, "overwrite": True, "epochs": 1}), **QUIET)
    assert res.epochs_done == 1 and len(res.history) == 1


def test_corrupt_checkpoint_is_reported_and_the_previous_kept(tmp_path, tiny):
    cfg = tiny(tmp_path)
    fit(cfg, **QUIET)
    run = Path(cfg.out)
    prev = (run / PREV).read_bytes()
    (run / LAST).write_bytes((run / LAST).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt.*prev.pt.* is intact: resume from it with --resume"):
        fit(FitConfig(resume=str(run), progress=False), **QUIET)
    assert (run / PREV).read_bytes() == prev
    res = fit(FitConfig(resume=str(run / PREV), progress=False), **QUIET)  # the previous checkpoint works
    assert res.epochs_done == 2


def test_resume_refuses_other_training_settings(tmp_path, tiny):
    cfg = tiny(tmp_path, epochs=1)
    fit(cfg, **QUIET)
    with pytest.raises(ValueError, match="cannot resume with different training settings.*lr: checkpoint 0.05"):
        fit(FitConfig(resume=cfg.out, lr=0.2, progress=False), **QUIET)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(sample_rate=0), FineregError, "--sample-rate must be a finite number > 0 and <= 100, got 0"),
        (dict(batch_size=400), ValueError, "fewer than one batch"),
        (dict(method="l2sq"), KeyError, "no method named 'l2sq'"),
        (dict(method="erm", set={"bss.k": 2}), ValueError, "--set names method 'bss', which is not in 'erm'"),
        (
            dict(arch="resnet18", weights="none"),
            ValueError,
            "'resnet18' cannot read the images of 'digits' \\(shape \\(1, 8, 8\\)",
        ),
        (dict(epochs=0), FineregError, "--epochs must be an integer >= 1, got 0"),
        (dict(lr_gamma=-1), FineregError, "--lr-gamma must be a finite number > 0 and <= 1, got -1"),
        (dict(momentum=1.5), FineregError, "--momentum must be a finite number >= 0 and < 1, got 1.5"),
        (dict(weight_decay=-0.1), FineregError, "--weight-decay must be a finite number >= 0"),
        (dict(iters_per_epoch=2.5), FineregError, "--iters-per-epoch must be an integer >= 1, got 2.5"),
        (dict(lr_steps=[0]), FineregError, "each of --lr-steps \\(an epoch\\) must be an integer >= 1, got 0"),
        (dict(backbone_lr_mult=float("inf")), FineregError, "--backbone-lr-mult must be a finite number >= 0"),
        (dict(data="nowhere/at/all"), FileNotFoundError, "neither a built-in dataset"),
    ],
)
def test_bad_fit_input(tmp_path, tiny, kw, exc, match):
    with pytest.raises(exc, match=match):
        fit(tiny(tmp_path, **kw), **QUIET)


def test_bf16_autocast_runs(tmp_path, tiny):
    res = fit(tiny(tmp_path, bf16=True, epochs=1), **QUIET)
    assert torch.isfinite(torch.tensor(res.final["train_loss"])) and res.final["test_top1"] > 20


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "finereg",
        "fit",
        "--out",
        str(out),
        "--epochs",
        "100000",
        "-i",
        "2",
        "-b",
        "16",
        "--no-progress",
        "--no-tensorboard",
        "--sample-rate",
        "30",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.csv").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the run did not finish an epoch in 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stdout
    ck = load_checkpoint(out)
    done = ck["epoch"]
    assert done >= 1 and len(ck["history"]) == done
    res = fit(FitConfig(resume=str(out), epochs=done + 1, progress=False), **QUIET)  # and it continues
    assert res.epochs_done == done + 1 and not res.interrupted


@pytest.mark.slow
def test_compile_flag_trains_like_eager(tmp_path, tiny):
    eager = fit(tiny(tmp_path / "eager", epochs=1), **QUIET)
    compiled = fit(tiny(tmp_path / "compiled", epochs=1, compile=True), **QUIET)
    for k, v in eager.net.state_dict().items():
        torch.testing.assert_close(compiled.net.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_fit_on_an_image_folder_with_torchvision_weights_from_a_file(tmp_path):
    import numpy as np
    import torchvision
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )
    (root / "train" / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    logs = []
    res = fit(
        FitConfig(
            data=str(root),
            arch="resnet18",
            weights=str(weights),
            out=str(tmp_path / "run"),
            epochs=1,
            iters_per_epoch=2,
            batch_size=4,
            image_size=32,
            workers=0,
            progress=False,
            tensorboard=False,
        ),
        log=logs.append,
    )
    assert res.epochs_done == 1 and 0 <= res.final["test_top1"] <= 100
    assert res.net.head.out_features == 3 and res.net.source_head.out_features == 10
    assert any("skipped 1 unreadable image(s)" in m and "bad.png" in m for m in logs)
    assert load_checkpoint(res.run_dir)["classes"] == ["a", "b", "c"]


def test_lr_column_is_the_lr_the_epoch_trained_with(tmp_path):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "3", "--lr-steps", "2"]) == 0
    assert [r["lr"] for r in load_checkpoint(run)["history"]] == pytest.approx([0.05, 0.05, 0.005])


def test_resume_with_fewer_epochs_is_refused_and_a_complete_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "2"]) == 0
    before = digest(run)
    capsys.readouterr()
    assert main(["fit", "--resume", str(run), "--epochs", "1"]) == 2
    assert "already holds 2 epochs, more than --epochs 1" in capsys.readouterr().err
    assert main(["fit", "--resume", str(run)]) == 0
    assert "is complete (2 of 2 epochs); train longer with --epochs N" in capsys.readouterr().out
    after = digest(run)  # config.json is rewritten; the training state is untouched
    assert all(after[k] == before[k] for k in (LAST, PREV, "metrics.csv", "metrics.jsonl"))


def _break_val_images(paths):
    """``on_step``: after the first step, the given evaluation images become unreadable (a disk error mid-run)."""

    def on_step(info):
        if info.step == 1:
            for p in paths:
                p.write_bytes(b"broken after the start")

    return on_step


@pytest.mark.parametrize("lost", ["one image", "a whole class"])
def test_unreadable_evaluation_images_are_counted_and_fail_past_a_threshold(tmp_path, lost):
    """Before: evaluation images failing to load mid-run were dropped from the accuracy silently."""
    root = tmp_path / "data"
    image_folder(root, per_class=4, val_per_class=20)
    broken = [root / "val" / "dog" / "3.png"] if lost == "one image" else sorted((root / "val" / "dog").iterdir())
    cfg = FitConfig(data=str(root), arch="resnet18", weights="none", image_size=16, epochs=1, iters_per_epoch=2,
                    batch_size=4, workers=0, out=str(tmp_path / "run"), progress=False, tensorboard=False)  # fmt: skip
    logs = []
    if lost == "one image":  # 1 of 40: reported beside the accuracy
        res = fit(cfg, on_step=_break_val_images(broken), log=logs.append)
        assert res.final["test_skipped_images"] == 1
        assert any("1 test images could not be read" in m for m in logs)
    else:  # a class vanishes from the accuracy: refused
        with pytest.raises(FineregError, match="20 of 40 test images could not be read; class\\(es\\) dog lost"):
            fit(cfg, on_step=_break_val_images(broken), log=logs.append)


def test_a_non_finite_evaluation_loss_is_a_diverged_run(tmp_path, tiny, capsys):
    """Issue 17 item 7: one step at a huge lr leaves a finite training loss but weights that evaluate to a NaN
    loss; the run is diverged (LossNotFinite, no checkpoint of the epoch, exit code 2), not "done"."""
    from finereg.train.loop import LossNotFinite

    with pytest.raises(LossNotFinite, match="evaluation loss is not finite after epoch 1"):
        fit(tiny(tmp_path, epochs=1, iters_per_epoch=1, lr=1e37), **QUIET)
    assert not (tmp_path / "run" / LAST).exists()
    out = tmp_path / "cli"
    assert main(["fit", *TINY, "-i", "1", "--lr", "1e37", "--out", str(out)]) == 2
    assert "evaluation loss is not finite" in capsys.readouterr().err and not (out / LAST).exists()
    from finereg.train.bench import _one  # the bench reports it as a diverged run of its grid

    row = _one(tiny(tmp_path / "bench", epochs=1, iters_per_epoch=1, lr=1e37))
    assert "evaluation loss is not finite" in row["diverged"]
