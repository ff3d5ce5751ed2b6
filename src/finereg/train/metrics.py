"""Per-epoch metrics to CSV, JSON lines and TensorBoard, plus the accuracy measures of an evaluation pass."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from torch import Tensor

from .._utils import atomic_write

__all__ = ["MetricsLogger", "accuracy_from_counts", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def accuracy_from_counts(correct: Tensor, total: Tensor) -> tuple[float, float]:
    """(top-1 %, mean per-class accuracy %) from per-class correct and sample counts.

    Mean per-class accuracy averages over the classes that have samples.
    """
    correct, total = correct.double(), total.double()
    top1 = 100.0 * float(correct.sum() / total.sum().clamp_min(1))
    has = total > 0
    per_class = 100.0 * float((correct[has] / total[has]).mean()) if bool(has.any()) else 0.0
    return top1, per_class


class MetricsLogger:
    """Writes the metric rows of a run: ``metrics.csv``, ``metrics.jsonl`` and TensorBoard events in ``tb/``.

    The whole history is rewritten (atomically) at each epoch from the rows held in memory, so a resumed run's
    files equal an uninterrupted run's; TensorBoard drops events after the resume point (``purge_step``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        history: list[dict] | None = None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.history: list[dict] = list(history or [])
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=len(self.history) + 1)
            except ImportError:  # pragma: no cover - tensorboard is in the train extra
                self._tb = None

    def log(self, row: dict) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.history)
        write_text_atomic(self.run_dir / "metrics.csv", buf.getvalue())
        write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        if self._tb is not None:
            step = int(row.get("epoch", len(self.history)))
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    group, _, name = k.partition("_")  # train_loss -> train/loss, test_top1 -> test/top1
                    self._tb.add_scalar(f"{group}/{name}" if name else f"misc/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
