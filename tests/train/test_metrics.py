"""Per-epoch metrics: CSV, JSON lines and TensorBoard files that a resumed run rewrites to equal an uninterrupted
run's, and the accuracy measures of an evaluation."""

import csv
import json

import pytest
import torch

from finereg.train.metrics import MetricsLogger, accuracy_from_counts


def test_accuracy_from_counts_top1_and_mean_per_class():
    correct, total = torch.tensor([9.0, 1.0, 0.0]), torch.tensor([10.0, 10.0, 0.0])  # class 2 has no sample
    top1, per_class = accuracy_from_counts(correct, total)
    assert top1 == pytest.approx(50.0) and per_class == pytest.approx(50.0)
    top1, per_class = accuracy_from_counts(torch.tensor([9.0, 1.0]), torch.tensor([10.0, 2.0]))
    assert top1 == pytest.approx(100 * 10 / 12) and per_class == pytest.approx(100 * (0.9 + 0.5) / 2)
    assert accuracy_from_counts(torch.zeros(2), torch.zeros(2)) == (0.0, 0.0)


def test_logger_rewrites_the_whole_history_and_groups_tensorboard_tags(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log({"epoch": 1, "lr": 0.1, "train_loss": 2.0, "test_top1": 50.0})
    log.log({"epoch": 2, "lr": 0.1, "train_loss": 1.0, "test_top1": 60.0, "shift_top1": 40.0})  # a new column
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["shift_top1"] == "" and rows[1]["shift_top1"] == "40.0"
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == log.history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "test/top1", "shift/top1", "misc/lr"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("test/top1")] == [50.0, 60.0]
    # a resumed run starts from the recorded history: the files equal an uninterrupted run's
    again = MetricsLogger(tmp_path / "resumed", history=log.history[:1], tensorboard=False)
    again.log(log.history[1])
    assert (tmp_path / "resumed" / "metrics.csv").read_text() == (tmp_path / "metrics.csv").read_text()


def test_a_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "rank1", enabled=False)  # the non-main processes of a distributed run
    log.log({"epoch": 1, "train_loss": 1.0})
    log.close()
    assert log.history == [{"epoch": 1, "train_loss": 1.0}] and not (tmp_path / "rank1").exists()
