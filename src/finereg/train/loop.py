"""The training engine: :func:`fit` fine-tunes a network with any method recipe and records the run.

``fit`` = hold the run directory (:mod:`.run_dir`) → :func:`~finereg.train.build.build` the run → per epoch
:func:`train_one_epoch` (each step :func:`train_step`) → :func:`evaluate` → metrics (CSV, JSONL, TensorBoard) and
an atomic checkpoint. SGD with momentum trains the backbone at ``backbone_lr_mult`` × the head's learning rate
(tllib's ``--finetune``) with a step schedule; evaluation reports top-1 and mean per-class accuracy.

Exact resume: each epoch's data order, augmentation and global RNG derive from ``(seed, epoch)``, and a
checkpoint taken mid-epoch (Ctrl-C, SIGTERM) also stores the step, the RNG state and the running sums, so a
resumed run equals an uninterrupted one. Under ``torchrun`` the model is wrapped in DistributedDataParallel;
``batch_size`` is the global batch, cut into equal slices per process, so N processes take the steps one
process takes. The process's global torch state (deterministic algorithms, thread count) is restored on return.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, require_module
from . import dist as fdist
from .build import Run, build
from .checkpoint import load_checkpoint
from .config import FitConfig, check_config, merge_resume
from .data import Batch, derive_seed, epoch_plan
from .datasets import builtin_name
from .metrics import accuracy_from_counts
from .models import Outputs, TransferNet, build_model
from .retention import Retention
from .run_dir import RunDir

__all__ = [
    "FitConfig",
    "FitResult",
    "StepInfo",
    "LossNotFinite",
    "fit",
    "train_one_epoch",
    "train_step",
    "evaluate",
    "load_trained",
]


class LossNotFinite(FineregError, FloatingPointError):
    """The loss became NaN or infinite: the learning rate or a trade-off is too large for this run."""


# Evaluation images that fail to load are left out and counted; past this share of the evaluation set (or when a
# class loses all of its images) the accuracy would mislead, and evaluation fails.
MAX_UNREADABLE = 0.05


@dataclass
class StepInfo:
    """Passed to the ``on_step`` callback after each optimizer step."""

    epoch: int  # 0-based epoch in progress
    step: int  # steps done in this epoch
    steps_per_epoch: int
    terms: dict[str, float]
    model: nn.Module


@dataclass
class FitResult:
    """A run's directory, metric rows, the fine-tuned network (eval mode) and whether it was interrupted."""

    run_dir: Path
    epochs_done: int
    history: list[dict]
    net: TransferNet
    interrupted: bool = False
    config: FitConfig | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


class _Stop:
    """Ctrl-C / SIGTERM → stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested, self._log = False, log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._log(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
            "(Ctrl-C again to abort without saving)"
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Meter:
    """Running sample-weighted sums of the loss terms and the training accuracy of an epoch."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.n = int(state.get("n", 0))
        self.correct = int(state.get("correct", 0))
        self.skipped = int(state.get("skipped", 0))  # images that failed to load during the epoch

    def update(self, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        b = y.numel()
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach()) * b
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(sum(t.detach() for t in terms.values())) * b
        self.n += b
        self.correct += int((logits.detach().argmax(1) == y).sum())

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "n": self.n, "correct": self.correct, "skipped": self.skipped}

    def reduced(self, device: torch.device) -> dict[str, float]:
        """Epoch means over all processes."""
        keys = sorted(self.sums)
        t = torch.tensor(
            [self.sums[k] for k in keys] + [self.n, self.correct, self.skipped], dtype=torch.float64, device=device
        )
        fdist.all_reduce_sum(t)
        n = max(float(t[-3]), 1.0)
        row = {f"train_{k}": float(v) / n for k, v in zip(keys, t[:-3])}
        row["train_acc"] = 100.0 * float(t[-2]) / n
        if t[-1] > 0:
            row["train_skipped_images"] = int(t[-1])
        return row


# ---------------------------------------------------------------------------------------------------- fit
def fit(
    cfg: FitConfig, *, on_step: Callable[[StepInfo], None] | None = None, log: Callable[[str], None] | None = None
) -> FitResult:
    """Fine-tune as ``cfg`` says (defaults: :mod:`finereg.train.config`); returns the run directory, the metric
    history and the trained network. An interrupt (Ctrl-C, SIGTERM, or ``KeyboardInterrupt`` raised by
    ``on_step``) saves a checkpoint at the last finished step and returns with ``interrupted`` set."""
    check_config(cfg)
    info = fdist.setup_distributed(cfg.device)
    say = log or print
    logp = (lambda msg: say(msg)) if info.is_main else (lambda msg: None)
    resume = None
    if cfg.resume:
        resume = cfg.resume if isinstance(cfg.resume, (str, os.PathLike)) else cfg.out
        if resume is None:
            raise FineregError("resume needs the run directory (or a checkpoint file): --resume RUN_DIR")
        held = RunDir.folder_of(resume)
        if cfg.out is not None and Path(cfg.out).expanduser().resolve() != held.resolve():
            raise FineregError(
                f"--resume {resume} continues the run in {str(held)!r}, but --out says {cfg.out!r}; drop --out "
                "(a resumed run stays in its directory), or start a new run in --out without --resume"
            )
    out = cfg.out
    if resume is None and out is None:  # one name for all processes
        out = fdist.broadcast_object(f"runs/fit-{time.strftime('%Y%m%d-%H%M%S')}" if info.is_main else None)
    with ExitStack() as stack:
        rd = stack.enter_context(RunDir(out or "", resume=resume, overwrite=cfg.overwrite, lock=info.is_main))
        if rd.checkpoint is not None:
            cfg = merge_resume(cfg, rd.checkpoint["config"])
        if cfg.progress and info.is_main:  # before the set-up, not when the first epoch starts
            require_module("tqdm.auto", "the progress bars", "tqdm (or 'finereg[train]')", "or run with --no-progress")
        fdist.barrier()
        stack.enter_context(_torch_state(cfg, info.device))
        run = build(cfg, rd, info, logp)
        stack.callback(run.close)
        interrupted = _train(run, on_step)
        history = run.logger.history
        return FitResult(rd.path, len(history), list(history), run.net.eval(), interrupted, run.cfg)


@contextlib.contextmanager
def _torch_state(cfg: FitConfig, device: torch.device):
    """Deterministic algorithms and the thread count for the run; the caller's settings restored after it."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    wanted = cfg.threads or (1 if cfg.data == "digits" else None)
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _train(run: Run, on_step: Callable[[StepInfo], None] | None) -> bool:
    """The epochs from the resume point: train, evaluate, log, checkpoint. Returns whether it was interrupted."""
    cfg = run.cfg
    if run.start_epoch >= cfg.epochs:
        run.log(f"{run.run_dir} is complete ({run.start_epoch} of {cfg.epochs} epochs); train longer with --epochs N")
    elif run.start_epoch or run.start_step:
        at = f", step {run.start_step}" if run.start_step else ""
        run.log(f"resuming {run.run_dir} at epoch {run.start_epoch + 1}{at}")
    with _Stop(run.log) as stop:
        for epoch in range(run.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            meter = train_one_epoch(run, epoch, stop, on_step)
            if meter is None:
                return True
            lr = max(g["lr"] for g in run.optimizer.param_groups)  # the new head's lr during this epoch
            run.scheduler.step()
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                **meter.reduced(run.info.device),
            }
            every = cfg.eval_every
            if epoch + 1 == cfg.epochs or (every and (epoch + 1) % every == 0):
                for prefix, images in run.data.evaluation_sets().items():
                    n = len(run.data.classes)
                    bs = max(cfg.batch_size, 256)
                    keep = run.retention if prefix == "test" else None
                    row.update(
                        evaluate(run.net, images, bs, run.info.device, n, run.autocast, prefix=prefix, retention=keep)
                    )
                    if row.get(f"{prefix}_skipped_images"):
                        skipped = row[f"{prefix}_skipped_images"]
                        run.log(f"epoch {epoch + 1}: {skipped} {prefix} images could not be read")
                bad = {k: v for k, v in row.items() if k.endswith("_loss") and not k.startswith("train_")}
                bad = {k: v for k, v in bad.items() if not math.isfinite(v)}
                if bad:  # a diverged network (weights at inf / NaN) evaluates to a NaN loss: a diverged run
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in bad.items())
                    raise LossNotFinite(
                        f"the evaluation loss is not finite after epoch {epoch + 1} ({shown}): the weights diverged; "
                        "lower --lr or the trade-offs"
                    )
            row["epoch_seconds"] = time.perf_counter() - t0
            run.logger.log(row)
            run.checkpoint(epoch + 1, 0, None, None)
            shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch_seconds" and "_" in k)
            run.log(f"epoch {epoch + 1}/{cfg.epochs}: {shown}")
    return False


def train_one_epoch(
    run: Run, epoch: int, stop: _Stop, on_step: Callable[[StepInfo], None] | None = None
) -> _Meter | None:
    """One epoch of steps from the epoch plan (from the resume step, if any); ``None`` when interrupted (then a
    checkpoint at the last finished step was saved, unless the interrupt came inside a step)."""
    cfg, info = run.cfg, run.info
    first = run.start_step if epoch == run.start_epoch else 0
    if first and run.rng is not None:
        torch.set_rng_state(run.rng)
    else:
        torch.manual_seed(derive_seed(cfg.seed, epoch, 1))
    meter = _Meter(run.meter_state if first else None)
    order, seeds = epoch_plan(len(run.data.train), cfg.batch_size, run.steps, cfg.seed, epoch)
    cut = run.batch_slice
    batches = run.data.train.train_batches(order[first:, cut], seeds[first:, cut], run.views, info.device)
    run.model.train()
    bar = _bar(cfg.progress and info.is_main, run.steps, first, f"epoch {epoch + 1}/{cfg.epochs}")
    step, in_step = first, False
    try:
        for batch in batches:
            meter.skipped += batch.skipped
            if batch.y.numel() == 0:  # every image of the batch failed to load
                if info.distributed:
                    raise FineregError(f"no image of a batch of epoch {epoch + 1} could be read")
                step += 1
                continue
            in_step = True
            batch = run.on_device(batch)
            terms, logits = train_step(run, batch, epoch, step)
            in_step = False
            step += 1
            meter.update(terms, logits, batch.y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in meter.means().items()}, refresh=False)
            if on_step is not None:
                on_step(StepInfo(epoch, step, run.steps, {k: float(v.detach()) for k, v in terms.items()}, run.model))
            if _stop_requested(stop.requested, info):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if in_step:
            run.log(f"interrupted inside a step; the last checkpoint in {run.run_dir} is kept")
        else:
            run.checkpoint(epoch, step, meter.state(), torch.get_rng_state())
            run.log(
                f"interrupted at epoch {epoch + 1}, step {step}: checkpoint saved; continue with "
                f"finereg fit --resume {run.run_dir}"
            )
        return None
    finally:
        if bar is not None:
            bar.close()
    return meter


def train_step(run: Run, batch: Batch, epoch: int = 0, step: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """One optimizer step: forward (the recipe's, if it wraps the network), cross-entropy plus every recipe's
    terms, backward, update. Returns the terms and the logits; a non-finite loss is an error naming the terms."""
    with run.autocast():
        out: Outputs = run.forward(batch)
    out = out.float()
    terms = {"ce": F.cross_entropy(out.logits, batch.y)}
    for r in run.recipes:
        terms.update(r.terms(batch, out, run.ctx))
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise LossNotFinite(
            f"loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} ({shown}); lower --lr or the "
            "trade-offs"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return terms, out.logits


@torch.no_grad()
def evaluate(
    net: nn.Module,
    data,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    *,
    prefix: str = "test",
    retention: Retention | None = None,
) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (%) and mean cross-entropy of ``net`` (eval mode) on ``data``, as
    ``<prefix>_top1``, ``<prefix>_mean_class_acc`` and ``<prefix>_loss``.

    Under torch.distributed each process evaluates every N-th sample and the counts are summed. Images that fail
    to load are left out and counted (``<prefix>_skipped_images``); more than :data:`MAX_UNREADABLE` of them, or a
    class left without images, raises :class:`FineregError`. With ``retention`` (:mod:`finereg.train.retention`)
    also ``<prefix>_retention``: the agreement (%) of the original classifier on the network's features with the
    pretrained model's predictions, from the same forward of the backbone.
    """
    was = net.training
    net.eval()
    r, w = fdist.rank(), fdist.world_size()
    idx = torch.arange(len(data))[r::w]
    stats = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, total per class
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, unreadable images, source agreement
    for b in data.eval_batches(batch_size, device, idx):
        sums[1] += b.skipped
        if b.x.numel() == 0:
            continue
        with autocast():
            if retention is None:
                logits = net(b.x)
            else:  # one forward of the backbone for both heads
                feats = net.backbone(b.x)
                logits = net.head(feats)
                agree = retention.head(feats).argmax(1) == retention.reference[b.index.to(device)]
                sums[2] += agree.sum().double()
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, b.y, reduction="sum").double()
        hit = (logits.argmax(1) == b.y).double()
        stats[0].index_add_(0, b.y, hit)
        stats[1].index_add_(0, b.y, torch.ones_like(hit))
    fdist.all_reduce_sum(stats)
    fdist.all_reduce_sum(sums)
    net.train(was)
    skipped = int(sums[1])
    if skipped:
        lost = torch.nonzero(stats[1].cpu() == 0).flatten().tolist()
        if skipped > MAX_UNREADABLE * len(data) or lost:
            classes = getattr(data, "classes", None) or list(range(num_classes))
            why = f"; class(es) {', '.join(str(classes[i]) for i in lost)} lost all their images" if lost else ""
            raise FineregError(
                f"{skipped} of {len(data)} {prefix} images could not be read{why}: the accuracy would not be that of "
                f"the {prefix} set. Check the files (disk, permissions) and run again (--resume)"
            )
    top1, mean_class = accuracy_from_counts(stats[0].cpu(), stats[1].cpu())
    row = {f"{prefix}_top1": top1, f"{prefix}_mean_class_acc": mean_class}
    row[f"{prefix}_loss"] = float(sums[0] / stats[1].sum().clamp(1))
    if retention is not None:
        row[f"{prefix}_retention"] = 100.0 * float(sums[2] / stats[1].sum().clamp(1))
    if skipped:
        row[f"{prefix}_skipped_images"] = skipped
    return row


def _stop_requested(local: bool, info: fdist.DistInfo) -> bool:
    if not info.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=info.device)
    fdist.all_reduce_sum(flag)
    return bool(flag.item() > 0)


def _bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def load_trained(path: str | os.PathLike) -> TransferNet:
    """The fine-tuned :class:`TransferNet` of a run directory or checkpoint, in eval mode."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    state = ckpt["net"]
    bundle = build_model(
        cfg["arch"], len(ckpt["classes"]), weights="none", in_channels=_in_channels(cfg["data"], state)
    )
    net = bundle.net
    if any(k.startswith("source_head.") for k in state):
        w = state["source_head.weight"]
        net.source_head = nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)
    net.load_state_dict(state)
    return net.eval()


def _in_channels(data: str, state: dict) -> int:
    if builtin_name(data) in ("digits", "mnist5k"):
        return 1
    first = next((v for k, v in state.items() if v.ndim == 4), None)
    return int(first.shape[1]) if first is not None else 3
