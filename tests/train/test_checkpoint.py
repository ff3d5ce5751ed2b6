"""Checkpoints: atomic writes, the previous one kept, checksums, clear errors for corrupt files and full disks."""

import os
import resource
import signal
import stat
import subprocess
import sys

import pytest
import torch

from finereg.train.checkpoint import (
    LAST,
    PREV,
    CheckpointError,
    atomic_save,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_save_rotates_last_to_prev(tmp_path):
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, tmp_path)
    assert not (tmp_path / PREV).exists()
    save_checkpoint({"epoch": 2, "w": torch.zeros(2)}, tmp_path)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert load_checkpoint(tmp_path / PREV)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREV]  # no temporary files left


def test_corrupt_last_names_the_intact_previous(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path)
    save_checkpoint({"epoch": 2}, tmp_path)
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 3])  # truncated, as by a crash of another writer
    with pytest.raises(CheckpointError, match=r"corrupt.*previous checkpoint .*prev\.pt.* is intact"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / PREV)["epoch"] == 1


def test_not_a_checkpoint_and_missing(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a finereg training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        find_checkpoint(tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None else tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")  # empty, and no prev.pt to fall back on
    with pytest.raises(CheckpointError, match="corrupt or unreadable.*start the run again .*--overwrite"):
        load_checkpoint(tmp_path / "run")


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    """Before: one flipped byte in a tensor's data loaded fine, and a run resumed with different weights."""
    save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, tmp_path)
    save_checkpoint({"epoch": 2, "w": torch.ones(1000)}, tmp_path)
    data = bytearray((tmp_path / LAST).read_bytes())
    data[data.index(torch.ones(1000).numpy().tobytes()) + 1001] ^= 0x10  # inside w's storage
    (tmp_path / LAST).write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / LAST, weights_only=True)["w"], torch.ones(1000))  # torch loads it
    with pytest.raises(CheckpointError, match=r"fails its checksum.*prev\.pt.* is intact"):
        load_checkpoint(tmp_path)


def test_both_checkpoints_damaged_is_said_so(tmp_path):
    """Before: with last.pt and prev.pt both truncated, the message still said 'prev.pt is intact'."""
    save_checkpoint({"epoch": 1}, tmp_path)
    save_checkpoint({"epoch": 2}, tmp_path)
    for name in (LAST, PREV):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"prev\.pt' is damaged too: there is no intact checkpoint") as e:
        load_checkpoint(tmp_path)
    assert "is intact" not in str(e.value)


def test_files_follow_the_umask(tmp_path):
    """Before: every file written atomically was mode 0600 whatever the umask (mkstemp)."""
    old = os.umask(0o027)
    try:
        atomic_save({"v": 1}, tmp_path / "a.pt")
        save_checkpoint({"epoch": 1}, tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / LAST).stat().st_mode) == 0o640


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_mid_run_says_so_and_keeps_the_last_checkpoint(tmp_path):
    """Before: '[enforce fail at inline_container.cc:672] unexpected pos ...'. The write limit of the child process
    (RLIMIT_FSIZE, with SIGXFSZ ignored) makes its checkpoint write fail as a full disk does."""
    run = tmp_path / "run"
    base = [sys.executable, "-m", "finereg", "fit", "--no-progress", "--no-tensorboard", "-i", "2", "-b", "16"]
    subprocess.run([*base, "--out", str(run), "--epochs", "1"], check=True, capture_output=True, timeout=120)
    before = (run / LAST).read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    r = subprocess.run([*base, "--resume", str(run), "--epochs", "2"], capture_output=True, text=True,
                       timeout=120, preexec_fn=limit)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "could not write a checkpoint" in r.stderr and "the file size limit is exceeded" in r.stderr
    assert "is intact (checkpoints are written atomically)" in r.stderr and "Traceback" not in r.stderr
    assert (run / LAST).read_bytes() == before and load_checkpoint(run)["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
