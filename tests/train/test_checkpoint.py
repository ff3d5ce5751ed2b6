"""Checkpoints: atomic writes, the previous one kept, clear errors for corrupt files."""

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
