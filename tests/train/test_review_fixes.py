"""Bad input loses nothing and says what to do: the cases a new-user review of the command line found."""

import hashlib
from pathlib import Path

import pytest

from finereg.train.checkpoint import LAST, PREV, load_checkpoint
from finereg.train.cli import main

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--no-tensorboard", "--sample-rate", "30"]


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_overwrite_with_bad_input_keeps_the_previous_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY]) == 0
    before = _digest(run)
    for bad in (
        ["--method", "l2-spp"],
        ["--data", str(tmp_path / "missing")],
        ["--weights", "/no/such.pt"],
        ["-b", "400"],
    ):  # 400 > the 89 training images: fails after data and model are built
        assert main(["fit", "--out", str(run), "--overwrite", *TINY, *bad]) == 2
        assert _digest(run) == before, bad
    capsys.readouterr()
    assert main(["fit", "--out", str(run), "--overwrite", *TINY, "--method", "l2sp"]) == 0  # a good one replaces it
    assert load_checkpoint(run)["config"]["method"] == "l2sp" and not (run / PREV).exists()


def test_hub_weights_for_the_builtin_network_are_an_error(tmp_path, capsys):
    for weights in ("pretrained", "IMAGENET1K_V1"):
        assert main(["fit", "--weights", weights, "--out", str(tmp_path / weights), *TINY]) == 2
        err = capsys.readouterr().err
        assert "--weights builtin" in err and "Traceback" not in err


def test_device_and_lr_are_checked_up_front(tmp_path, capsys):
    assert main(["fit", "--device", "tpu", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "unknown device 'tpu': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["fit", "--lr", "nan", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind


def test_lr_column_is_the_lr_the_epoch_trained_with(tmp_path):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "3", "--lr-steps", "2"]) == 0
    assert [r["lr"] for r in load_checkpoint(run)["history"]] == pytest.approx([0.05, 0.05, 0.005])


def test_resume_with_fewer_epochs_is_refused_and_a_complete_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "2"]) == 0
    before = _digest(run)
    capsys.readouterr()
    assert main(["fit", "--resume", str(run), "--epochs", "1"]) == 2
    assert "already holds 2 epochs, more than --epochs 1" in capsys.readouterr().err
    assert main(["fit", "--resume", str(run)]) == 0
    assert "is complete (2 of 2 epochs); train longer with --epochs N" in capsys.readouterr().out
    after = _digest(run)  # config.json is rewritten; the training state is untouched
    assert all(after[k] == before[k] for k in (LAST, PREV, "metrics.csv", "metrics.jsonl"))


def test_resuming_from_prev_after_a_corrupt_last_keeps_the_intact_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "3"]) == 0
    (run / LAST).write_bytes((run / LAST).read_bytes()[:1000])  # a crash or a disk error damaged it
    assert main(["fit", "--resume", str(run)]) == 2
    assert f"--resume {run / PREV}" in capsys.readouterr().err
    prev_bytes = (run / PREV).read_bytes()
    assert main(["fit", "--resume", str(run / PREV)]) == 0  # as the message says
    assert load_checkpoint(run)["epoch"] == 3
    assert (run / PREV).read_bytes() == prev_bytes  # the intact epoch-2 checkpoint is still the fallback
    assert (run / f"{LAST}.corrupt").stat().st_size == 1000


def test_method_spelling_errors_and_aliases(tmp_path, capsys):
    assert main(["fit", "--method", "l2sp+", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "has an empty part; join method names with single '+'" in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "l2-sp (= l2sp)" in capsys.readouterr().out
