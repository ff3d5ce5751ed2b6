"""Run directories: finereg never deletes a file it did not write, and one process at a time holds a run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finereg.train.checkpoint import LAST, PREV, load_checkpoint
from finereg.train.cli import main
from finereg.train.run_dir import LOCK, MARKER, DirLock, RunDir, RunDirError
from tests.train._util import digest

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--sample-rate", "30"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_dir(p: Path) -> None:
    (p / "tb" / "other").mkdir(parents=True)
    (p / "tb" / "other" / "ev").write_text("keep\n")
    (p / "config.json").write_text('{"mine":1}\n')


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_directory_that_is_not_a_run_is_refused_and_untouched(tmp_path, capsys, extra):
    p = tmp_path / "p"
    _user_dir(p)
    before = _tree(p)
    assert main(["fit", "--out", str(p), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no finereg run (config.json, tb)" in err and "Traceback" not in err
    assert _tree(p) == before and not (p / LOCK).exists()


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.txt").write_text("keep")
    assert main(["fit", "--out", "", *TINY]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    p = tmp_path / "run"
    assert main(["fit", "--out", str(p), *TINY, "--epochs", "2"]) == 0
    assert (p / MARKER).is_file() and sorted(x.name for x in (p / "tb").iterdir())[0].startswith("events.out")
    (p / "notes.txt").write_text("mine")
    (p / "tb" / "mine").mkdir()
    (p / "tb" / "mine" / "x").write_text("mine")
    assert main(["fit", "--out", str(p), *TINY, "--overwrite"]) == 0
    assert (p / "notes.txt").read_text() == "mine" and (p / "tb" / "mine" / "x").read_text() == "mine"
    assert load_checkpoint(p)["epoch"] == 1 and not (p / "prev.pt").exists()  # the 2-epoch run is gone
    assert len([x for x in (p / "tb").iterdir() if x.name.startswith("events.out")]) == 1


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    p = tmp_path / "new" / "run"
    assert main(["fit", "--out", str(p), *TINY, "--method", "nosuch"]) == 2
    assert not p.exists()


def test_resume_with_another_out_is_refused(tmp_path, capsys):
    p = tmp_path / "run"
    assert main(["fit", "--out", str(p), *TINY]) == 0
    capsys.readouterr()
    assert main(["fit", "--resume", str(p), "--out", str(tmp_path / "other"), "--epochs", "2"]) == 2
    assert "continues the run in" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["fit", "--resume", str(p), "--out", str(p), "--epochs", "2"]) == 0  # the same directory is fine


def test_the_lock_names_its_holder_and_is_exclusive_per_open(tmp_path):
    with DirLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunDirError, match=rf"in use by another finereg process \(pid {os.getpid()} on "):
            DirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()
    DirLock(tmp_path).acquire().release()  # free again


def test_a_running_fit_holds_its_directory_until_it_dies(tmp_path, capsys):
    p = tmp_path / "run"
    cmd = [sys.executable, "-m", "finereg", "fit", "--out", str(p), "--epochs", "1000", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (p / LAST).exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (p / LAST).exists()
        for args in (["--out", str(p)], ["--out", str(p), "--overwrite"], ["--resume", str(p)]):
            assert main(["fit", *args, *TINY[:-2], "--epochs", "1000"]) == 2, args
            err = capsys.readouterr().err
            assert f"is in use by another finereg process (pid {proc.pid} on " in err, err
        with pytest.raises(RunDirError, match="in use"):
            RunDir("", resume=p)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # the operating system released the lock of the killed process: the run resumes from its last checkpoint
    done = load_checkpoint(p)["epoch"]
    assert main(["fit", "--resume", str(p), "--epochs", str(done + 1), "--no-progress"]) == 0
    assert load_checkpoint(p)["epoch"] == done + 1


def test_overwrite_with_bad_input_keeps_the_previous_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY]) == 0
    before = digest(run)
    for bad in (
        ["--method", "l2-spp"],
        ["--data", str(tmp_path / "missing")],
        ["--weights", "/no/such.pt"],
        ["-b", "400"],
    ):  # 400 > the 89 training images: fails after data and model are built
        assert main(["fit", "--out", str(run), "--overwrite", *TINY, *bad]) == 2
        assert digest(run) == before, bad
    capsys.readouterr()
    assert main(["fit", "--out", str(run), "--overwrite", *TINY, "--method", "l2sp"]) == 0  # a good one replaces it
    assert load_checkpoint(run)["config"]["method"] == "l2sp" and not (run / PREV).exists()


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


def test_overwrite_removes_a_symlinked_tb_as_a_link_and_never_follows_it(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other_tb"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "2"]) == 0
    other.mkdir()
    (other / "events.out.tfevents.1.other").write_text("x")
    for p in (run / "tb").iterdir():
        p.unlink()
    (run / "tb").rmdir()
    (run / "tb").symlink_to(other)
    assert main(["fit", "--out", str(run), *TINY, "--overwrite"]) == 0
    assert (other / "events.out.tfevents.1.other").read_text() == "x"  # outside --out: untouched
    assert not (run / "tb").is_symlink() and any(p.name.startswith("events.out") for p in (run / "tb").iterdir())
    assert load_checkpoint(run)["epoch"] == 1


@pytest.mark.parametrize("what", ["tb-file", "dir-for-metrics"])
def test_overwrite_refuses_what_it_cannot_remove_before_deleting_anything(tmp_path, capsys, what):
    run = tmp_path / "run"
    assert main(["fit", "--out", str(run), *TINY, "--epochs", "2"]) == 0
    if what == "tb-file":
        for p in (run / "tb").iterdir():
            p.unlink()
        (run / "tb").rmdir()
        (run / "tb").write_text("mine")
    else:
        (run / "metrics.csv").unlink()
        (run / "metrics.csv").mkdir()
        (run / "metrics.csv" / "mine").write_text("mine")
    before = digest(run)
    capsys.readouterr()
    assert main(["fit", "--out", str(run), *TINY, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "nothing was deleted" in err and "Traceback" not in err, err
    assert digest(run) == before and (run / LAST).is_file() and (run / PREV).is_file()


@pytest.mark.parametrize(
    "protocol", [[], ["--protocol", "real", "--epochs", "1", "-i", "2", "--sample-rate", "15", "--no-progress"]]
)
def test_a_fit_trains_to_the_same_weights_on_a_cold_and_a_warm_cache(tmp_path, capsys, protocol):
    """The cache (the built-in source model, the frozen prefix's outputs) is checked, built or read outside the
    run's random stream: a fresh cache and a full one give bit-identical weights."""
    cache = tmp_path / "cache"
    args = TINY if not protocol else protocol
    weights = []
    for n in range(2):  # the first run fills the empty cache, the second finds it
        out = tmp_path / f"run{n}"
        assert main(["fit", "--out", str(out), "--cache-dir", str(cache), *args]) == 0
        weights.append(load_checkpoint(out)["model"])
    assert any(cache.rglob("*.pt"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), [
        k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])
    ]
