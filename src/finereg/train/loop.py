"""The training engine: :func:`fit` fine-tunes a network with any method recipe and records the run.

One call does: data (built-in or ImageFolder, sampled per class) → model (built-in / torchvision / timm, new
head, source head kept) → method recipes (set-up pass, loss terms) → SGD with momentum (backbone at
``backbone_lr_mult`` × the head's learning rate, tllib's ``--finetune``) and a step schedule → per-epoch
evaluation (top-1, mean per-class accuracy) → metrics (CSV, JSONL, TensorBoard) and an atomic checkpoint per
epoch. ``resume`` continues bit-for-bit: each epoch's data order, augmentation and global RNG derive from
``(seed, epoch)``, and a checkpoint taken mid-epoch (Ctrl-C) also stores the step, the RNG state and the
running sums. Under ``torchrun`` the model is wrapped in DistributedDataParallel; ``batch_size`` is the global
batch, cut into equal slices per process, so N processes take the steps one process takes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError
from . import dist as fdist
from .builtin import cache_dir as default_cache_dir
from .checkpoint import load_checkpoint, save_checkpoint
from .data import BUILTIN_DATASETS, TrainData, check_batch_size, derive_seed, epoch_plan, load_data
from .methods import Context, Recipe, StepOut, build_recipes, default_weight_decay, parse_overrides
from .metrics import MetricsLogger, accuracy_from_counts, write_text_atomic
from .models import TransferNet, build_model
from .run_dir import RunDir

__all__ = ["FitConfig", "FitResult", "StepInfo", "fit", "evaluate", "load_trained"]

# Defaults of the built-in digits task (measured in docs/engine.md): a short budget of 60 steps, the same for every
# sampling rate as tllib's fixed --iters-per-epoch; in it the pretrained start beats a random one by 5-10 points.
DIGITS = {"epochs": 6, "iters_per_epoch": 10, "batch_size": 32, "lr": 0.05}
# Defaults elsewhere: tllib's example scripts (20 epochs, lr 0.01, batch 48), an epoch being one pass.
FOLDER = {"epochs": 20, "iters_per_epoch": None, "batch_size": 48, "lr": 0.01}


@dataclass
class FitConfig:
    """Everything a run depends on. ``None`` means "the default for this data / method" (see :func:`fit`)."""

    data: str = "digits"
    arch: str = "builtin"
    weights: str | None = None
    method: str = "erm"
    set: dict[str, Any] = field(default_factory=dict)  # {"bss.trade_off": 0.001}
    sample_rate: float = 100
    data_seed: int = 0
    seed: int = 0
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None  # the global batch (split across processes)
    lr: float | None = None  # of the new head; the backbone takes backbone_lr_mult x lr
    backbone_lr_mult: float = 0.1
    lr_steps: list[int] | None = None
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    image_size: int = 224
    workers: int = 2
    threads: int | None = None  # CPU threads; default 1 on the built-in task (its tiny model runs fastest so)
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    deterministic: bool = True
    out: str | None = None
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = True
    cache_dir: str | None = None


# Fields that may change when a run resumes; all others must equal the checkpoint's.
_RESUME_FREE = {
    "epochs",
    "device",
    "workers",
    "threads",
    "progress",
    "tensorboard",
    "compile",
    "cache_dir",
    "out",
    "resume",
    "overwrite",
}


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


# ------------------------------------------------------------------------------------------------ helpers
def _resolve(cfg: FitConfig, recipes: list[Recipe]) -> FitConfig:
    """``cfg`` with its ``None`` fields set: the data's preset, the schedule at 60 % and tllib's weight decay."""
    preset = DIGITS if cfg.data in BUILTIN_DATASETS else FOLDER
    filled = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in preset.items()}
    steps = cfg.lr_steps if cfg.lr_steps is not None else [max(1, round(0.6 * filled["epochs"]))]
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(recipes)
    return dataclasses.replace(cfg, **filled, lr_steps=list(steps), weight_decay=wd)


def _check(cfg: FitConfig) -> None:
    for name in ("batch_size", "image_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.iters_per_epoch is not None and cfg.iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {cfg.iters_per_epoch}")
    if not 0 < cfg.sample_rate <= 100:
        raise ValueError(f"sample_rate is a percentage in (0, 100], got {cfg.sample_rate}")
    if (cfg.lr is not None and not 0 < cfg.lr < math.inf) or not 0 <= cfg.backbone_lr_mult < math.inf:
        raise ValueError(f"lr must be > 0 and backbone_lr_mult >= 0 (got {cfg.lr}, {cfg.backbone_lr_mult})")
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")


def _merge_resume(cfg: FitConfig, saved: dict) -> FitConfig:
    """The checkpoint's config, with the fields ``cfg`` changes from the defaults; a conflicting change of a
    field that shapes training raises ValueError listing them."""
    default = FitConfig()
    merged, conflicts = dict(saved), []
    for f in dataclasses.fields(FitConfig):
        new = getattr(cfg, f.name)
        if f.name not in saved or (f.name in _RESUME_FREE and new != getattr(default, f.name)):
            merged[f.name] = new
        elif new != getattr(default, f.name) and _norm(new) != _norm(saved[f.name]):
            conflicts.append(f"{f.name}: checkpoint {saved[f.name]!r}, now {new!r}")
    if conflicts:
        raise ValueError(
            "cannot resume with different training settings (" + "; ".join(conflicts) + "). Resume "
            "without them, or start a new run (another --out, or --overwrite)"
        )
    merged["resume"] = cfg.resume
    return FitConfig(**{f.name: merged[f.name] for f in dataclasses.fields(FitConfig)})


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _param_groups(model: nn.Module, net: TransferNet, lr: float, backbone_mult: float) -> list[dict]:
    """tllib's ``get_parameters``: the pretrained parts (backbone, source head) at ``backbone_mult``·lr, all
    new modules (target head, projector, ...) at lr."""
    pretrained = {id(p) for m in (net.backbone, net.source_head) if m is not None for p in m.parameters()}
    old, new = [], []
    for p in model.parameters():
        if p.requires_grad:
            (old if id(p) in pretrained else new).append(p)
    groups = [{"params": old, "lr": lr * backbone_mult, "name": "backbone"}, {"params": new, "lr": lr, "name": "head"}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def evaluate(
    net: nn.Module,
    data,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (%) and mean cross-entropy of ``net`` (eval mode) on ``data``.

    Under torch.distributed each process evaluates every N-th sample and the counts are summed.
    """
    was = net.training
    net.eval()
    r, w = fdist.rank(), fdist.world_size()
    idx = torch.arange(len(data))[r::w]
    stats = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, total per class
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    skipped = 0
    for b in data.eval_batches(batch_size, device, idx):
        skipped += b.skipped
        if b.x.numel() == 0:
            continue
        with autocast():
            logits = net(b.x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, b.y, reduction="sum").double()
        hit = (logits.argmax(1) == b.y).double()
        stats[0].index_add_(0, b.y, hit)
        stats[1].index_add_(0, b.y, torch.ones_like(hit))
    fdist.all_reduce_sum(stats)
    fdist.all_reduce_sum(loss_sum)
    net.train(was)
    top1, mean_class = accuracy_from_counts(stats[0].cpu(), stats[1].cpu())
    return {
        "val_top1": top1,
        "val_mean_class_acc": mean_class,
        "val_loss": float(loss_sum / stats[1].sum().clamp_min(1)),
    }


def _make_run_dir(cfg: FitConfig, info: fdist.DistInfo) -> Path:
    out = cfg.out
    if out is None:
        out = f"runs/fit-{time.strftime('%Y%m%d-%H%M%S')}" if info.is_main else None
        out = fdist.broadcast_object(out)
    return Path(out).expanduser()


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
    """Fine-tune as ``cfg`` says; returns the run directory, the metric history and the trained network.

    Defaults (``None`` fields): on the built-in ``digits`` task :data:`DIGITS` (6 epochs of 10 steps, batch 32,
    lr 0.05), else tllib's :data:`FOLDER` (20 epochs of one pass, batch 48, lr 0.01); the learning rate drops
    by ``lr_gamma`` at 60 % of the epochs; weight decay is tllib's for the method (0 for L2-SP / DELTA, whose
    penalties replace it; 5e-4 otherwise).
    Interrupt (Ctrl-C, SIGTERM, or KeyboardInterrupt from ``on_step``) → a checkpoint at the last finished
    step and ``FitResult.interrupted``.
    """
    _check(cfg)
    info = fdist.setup_distributed(cfg.device)
    say = log or print
    logp = (lambda msg: say(msg)) if info.is_main else (lambda msg: None)

    if cfg.out is not None and not str(cfg.out).strip():
        raise FineregError("--out is empty; give the run directory (default: runs/fit-<time>)")
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
    rd = RunDir(
        _make_run_dir(cfg, info) if resume is None else "",
        resume=resume,
        overwrite=cfg.overwrite,
        lock=info.is_main,
    )
    run_dir, ckpt = rd.path, rd.checkpoint

    prev_det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        if info.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    cache = default_cache_dir(cfg.cache_dir)
    prev_threads = torch.get_num_threads()
    threads = cfg.threads or (1 if cfg.data in BUILTIN_DATASETS else None)
    if threads:
        torch.set_num_threads(threads)
    recipes: list[Recipe] = []
    logger: MetricsLogger | None = None
    try:
        if ckpt is not None:
            cfg = _merge_resume(cfg, ckpt["config"])
        fdist.barrier()
        recipes = build_recipes(cfg.method, parse_overrides(cfg.set), digits=cfg.data in BUILTIN_DATASETS)
        cfg = _resolve(cfg, recipes)
        if ckpt is not None and ckpt["epoch"] > cfg.epochs:
            raise ValueError(
                f"{str(run_dir)!r} already holds {ckpt['epoch']} epochs, more than --epochs {cfg.epochs}; "
                "resume with at least as many epochs, or start a new run (another --out)"
            )
        torch.manual_seed(derive_seed(cfg.seed, 0xC0FFEE))  # new head init
        data = load_data(
            cfg.data,
            sample_rate=cfg.sample_rate,
            data_seed=cfg.data_seed,
            image_size=cfg.image_size,
            workers=cfg.workers,
            log=logp,
        )
        check_batch_size(len(data.train), cfg.batch_size)
        bundle = build_model(
            cfg.arch,
            len(data.classes),
            weights=cfg.weights,
            in_channels=data.in_channels,
            cache_dir=cfg.cache_dir,
            log=logp,
        )
        net = bundle.net.to(info.device)
        _probe(net, data, bundle.arch)
        needs_head = [r.name for r in recipes if r.uses_source_head]
        if needs_head and net.source_head is None:
            raise ValueError(
                f"{', '.join(needs_head)} needs the pretrained classifier as source head, and "
                f"weights {bundle.weights!r} bring none; use pretrained weights"
            )
        net.use_source_head = bool(needs_head)
        if any(r.trains_source_head for r in recipes):
            net.source_head.requires_grad_(True)
        source = None
        if any(r.needs_source for r in recipes):
            source = copy.deepcopy(net).eval().requires_grad_(False)
            source.use_source_head = False
        autocast = (
            (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
        )
        ctx = Context(
            net=net,
            data=data,
            dist=info,
            device=info.device,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            run_dir=run_dir,
            cache_dir=cache,
            log=logp,
            source=source,
            autocast=autocast,
        )
        if ckpt is not None:
            for r in recipes:
                r.load_state_dict(ckpt.get("recipes", {}).get(r.name, {}))
        model: nn.Module = net
        for r in recipes:  # wrap first: a wrapper's copies (Bi-Tuning's key encoder) must not carry others' hooks
            if r.wraps:
                model = r.wrap(net, ctx)
        model.to(info.device)
        fdist.barrier()
        for r in recipes:
            r.setup(ctx)
        if info.is_main:
            rd.begin(logp)
        forward = next((r.forward for r in recipes if r.wraps), None)
        views = max((r.views for r in recipes), default=1)

        optimizer = torch.optim.SGD(
            _param_groups(model, net, cfg.lr, cfg.backbone_lr_mult),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_steps, gamma=cfg.lr_gamma)
        start_epoch, start_step, history, meter_state, rng = 0, 0, [], None, None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, start_step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
            meter_state, rng = ckpt.get("meter"), ckpt.get("rng")
            if start_epoch >= cfg.epochs:
                logp(f"{run_dir} is complete ({start_epoch} of {cfg.epochs} epochs); train longer with --epochs N")
            else:
                logp(f"resuming {run_dir} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))

        train_model = model
        if info.distributed:
            if cfg.batch_size % info.world_size:
                raise ValueError(
                    f"batch_size {cfg.batch_size} (the global batch) must divide by the {info.world_size} processes"
                )
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
            # a size-1 dimension (1-channel input conv) makes equivalent strides differ; harmless
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        if cfg.compile:
            train_model = torch.compile(train_model)
        run_forward = (lambda b: forward(train_model, b)) if forward else (lambda b: StepOut.of(train_model(b.x)))

        n_train = len(data.train)
        steps = cfg.iters_per_epoch or n_train // cfg.batch_size
        if info.is_main:
            write_text_atomic(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
            logp(
                f"fit: {cfg.method} on {data.name} ({n_train} training images, {len(data.classes)} classes, "
                f"{cfg.sample_rate:g}% per class) | {bundle.arch} ({bundle.weights}) | {cfg.epochs} epochs x "
                f"{steps} steps x batch {cfg.batch_size} | " + ", ".join(map(repr, recipes))
            )
        logger = MetricsLogger(run_dir, history, enabled=info.is_main, tensorboard=cfg.tensorboard)
        lo, hi = info.rank * cfg.batch_size // info.world_size, (info.rank + 1) * cfg.batch_size // info.world_size

        def checkpoint(epoch: int, step: int, meter: _Meter | None, rng_state: Tensor | None) -> None:
            if info.is_main:
                save_checkpoint(
                    {
                        "config": dataclasses.asdict(cfg),
                        "epoch": epoch,
                        "step": step,
                        "model": model.state_dict(),
                        "net": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "recipes": {r.name: r.state_dict() for r in recipes},
                        "history": logger.history,
                        "meter": meter.state() if meter else None,
                        "rng": rng_state,
                        "classes": data.classes,
                    },
                    run_dir,
                )
            fdist.barrier()

        interrupted = False
        with _Stop(logp) as stop:
            epoch = start_epoch
            for epoch in range(start_epoch, cfg.epochs):
                first = start_step if epoch == start_epoch else 0
                if first and rng is not None:
                    torch.set_rng_state(rng)
                else:
                    torch.manual_seed(derive_seed(cfg.seed, epoch, 1))
                meter = _Meter(meter_state if first else None)
                order, seeds = epoch_plan(n_train, cfg.batch_size, steps, cfg.seed, epoch)
                batches = data.train.train_batches(order[first:, lo:hi], seeds[first:, lo:hi], views, info.device)
                model.train()
                bar = _bar(cfg.progress and info.is_main, steps, first, f"epoch {epoch + 1}/{cfg.epochs}")
                t0 = time.perf_counter()
                step = first
                in_step = False
                try:
                    for batch in batches:
                        meter.skipped += batch.skipped
                        if batch.y.numel() == 0:  # every image of the batch failed to load
                            if info.distributed:
                                raise RuntimeError(f"no image of a batch of epoch {epoch + 1} could be read")
                            step += 1
                            continue
                        in_step = True
                        with autocast():
                            out = run_forward(batch)
                        out = StepOut(
                            out.logits.float(),
                            None if out.features is None else out.features.float(),
                            None if out.source_logits is None else out.source_logits.float(),
                            out.extra,
                        )
                        terms = {"ce": F.cross_entropy(out.logits, batch.y)}
                        for r in recipes:
                            terms.update(r.terms(batch, out, ctx))
                        loss = sum(terms.values())
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} "
                                f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in terms.items())})"
                                "; lower --lr or the trade-offs"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        in_step = False
                        step += 1
                        meter.update(terms, out.logits, batch.y)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix({k: f"{v:.4g}" for k, v in meter.means().items()}, refresh=False)
                        if on_step is not None:
                            on_step(
                                StepInfo(epoch, step, steps, {k: float(v.detach()) for k, v in terms.items()}, model)
                            )
                        if _stop_requested(stop.requested, info):
                            raise KeyboardInterrupt
                except KeyboardInterrupt:
                    if bar is not None:
                        bar.close()
                    interrupted = True
                    if in_step:
                        logp(f"interrupted inside a step; the last checkpoint in {run_dir} is kept")
                    else:
                        checkpoint(epoch, step, meter, torch.get_rng_state())
                        logp(
                            f"interrupted at epoch {epoch + 1}, step {step}: checkpoint saved; continue with "
                            f"finereg fit --resume {run_dir}"
                        )
                    break
                if bar is not None:
                    bar.close()
                lr = optimizer.param_groups[-1]["lr"]  # the head's lr during this epoch
                scheduler.step()
                row = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    **meter.reduced(info.device),
                    **evaluate(net, data.val, cfg.batch_size, info.device, len(data.classes), autocast),
                    "epoch_seconds": time.perf_counter() - t0,
                }
                logger.log(row)
                checkpoint(epoch + 1, 0, None, None)
                logp(
                    f"epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("train_", "val_")))
                )
        return FitResult(run_dir, len(logger.history), list(logger.history), net.eval(), interrupted, cfg)
    except BaseException:
        rd.close(failed=True)
        raise
    finally:
        rd.close()
        for r in recipes:
            r.close()
        if logger is not None:
            logger.close()
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _probe(net: TransferNet, data: TrainData, arch: str) -> None:
    """One forward on two evaluation images, to turn a shape mismatch into a clear error before any work."""
    b = next(data.val.eval_batches(2, next(net.parameters()).device))
    try:
        with torch.no_grad():
            net.eval()(b.x)
    except RuntimeError as e:
        raise ValueError(
            f"architecture {arch!r} cannot read the images of {data.name!r} (shape "
            f"{tuple(b.x.shape[1:])}): {str(e).splitlines()[0]}. The built-in digits task takes "
            "--arch builtin; torchvision / timm models take an ImageFolder root of RGB images"
        ) from None
    finally:
        net.train()


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
    if data in BUILTIN_DATASETS:
        return 1
    first = next((v for k, v in state.items() if v.ndim == 4), None)
    return int(first.shape[1]) if first is not None else 3
