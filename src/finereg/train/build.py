"""Everything a run trains with, built from its configuration: :func:`build` returns a :class:`Run`.

The order matters and is fixed here: recipes (so bad method settings fail before any work) → data → network
(probed on two images) → recipes prepare it → frozen source copy (before any hook is registered, so it carries
none) → a recipe's wrapper (before the others' hooks, so the wrapper's copies carry none) → recipe set-up
(hooks, set-up passes; restored from the checkpoint on resume) → the run directory begins (only now is a
previous run's output replaced) → optimizer, then each recipe's :meth:`~finereg.train.recipe.Recipe.wrap_optimizer`
(so a wrapper's state is in the optimizer's ``state_dict``), then the schedule (both restored on resume) → DDP /
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError
from ..lr_policy import param_groups
from . import dist as fdist
from .builtin import cache_dir as default_cache_dir
from .checkpoint import save_checkpoint
from .config import FitConfig, resolve
from .data import Batch, TensorImages, TrainData, check_batch_size, derive_seed, dropped_note
from .datasets import builtin_name, load_data
from .methods import build_recipes, default_weight_decay, parse_overrides
from .metrics import MetricsLogger, write_text_atomic
from .models import ModelBundle, Outputs, TransferNet, build_model, input_normalization
from .prefix import freeze_prefix
from .recipe import Context, Recipe
from .retention import Retention, source_reference
from .run_dir import RunDir

__all__ = ["Run", "build", "build_task"]


@dataclass
class Run:
    """A run being trained: its settings, data, network, recipes, optimizer and where it resumes."""

    cfg: FitConfig
    info: fdist.DistInfo
    run_dir: Path
    data: TrainData
    net: TransferNet  # the network evaluated and returned
    model: nn.Module  # what is trained and checkpointed: ``net`` or a recipe's wrapper around it
    train_model: nn.Module  # ``model`` under DDP / torch.compile
    recipes: list[Recipe]
    ctx: Context
    optimizer: torch.optim.Optimizer
    scheduler: Any
    logger: MetricsLogger
    steps: int  # per epoch
    log: Callable[[str], None]
    forward: Callable[[Any], Outputs]
    views: int = 1
    autocast: Callable[[], Any] = contextlib.nullcontext
    start_epoch: int = 0
    start_step: int = 0
    meter_state: dict | None = None
    rng: Tensor | None = None
    retention: Retention | None = None  # measures forgetting on the test split (in-memory tasks with a source head)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def on_device(self, batch: Batch) -> Batch:
        """``batch`` in the memory format the network trains in."""
        if not self.cfg.channels_last or batch.x.dim() != 4:
            return batch
        cl = torch.channels_last
        views = [v.contiguous(memory_format=cl) for v in batch.views]
        return dataclasses.replace(batch, x=batch.x.contiguous(memory_format=cl), views=views)

    @property
    def batch_slice(self) -> slice:
        """This process's share of each global batch."""
        b, r, w = self.cfg.batch_size, self.info.rank, self.info.world_size
        return slice(r * b // w, (r + 1) * b // w)

    def checkpoint(self, epoch: int, step: int, meter: dict | None, rng: Tensor | None) -> None:
        """Save the complete training state (main process), then wait for all processes."""
        if self.info.is_main:
            state = {
                "config": dataclasses.asdict(self.cfg),
                "epoch": epoch,
                "step": step,
                "model": self.model.state_dict(),
                "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "recipes": {r.name: r.state_dict() for r in self.recipes},
                "history": self.logger.history,
                "meter": meter,
                "rng": rng,
                "classes": self.data.classes,
            }
            save_checkpoint(state, self.run_dir)
        fdist.barrier()

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def _probe(net: TransferNet, data: TrainData, arch: str) -> None:
    """One forward on two evaluation images, to turn a shape mismatch into a clear error before any work."""
    b = next(data.test.eval_batches(2, next(net.parameters()).device))
    try:
        with torch.no_grad():
            net.eval()(b.x)
    except RuntimeError as e:
        raise FineregError(
            f"architecture {arch!r} cannot read the images of {data.name!r} (shape {tuple(b.x.shape[1:])}): "
            f"{str(e).splitlines()[0]}. The built-in digits task takes --arch builtin; torchvision / timm models "
            "take an ImageFolder root of RGB images"
        ) from None
    finally:
        net.train()


def build_task(cfg: FitConfig, log: Callable[[str], None] = print) -> tuple[TrainData, ModelBundle]:
    """The data and the network of a resolved ``cfg``: the data normalized as the network expects, and with
    ``frozen_prefix`` the prefix frozen and its outputs (cached on disk) as the data's images. Also run once by
    ``finereg bench`` before its workers start, so that they find the caches made."""
    data = load_data(
        cfg.data,
        sample_rate=cfg.sample_rate,
        data_seed=cfg.data_seed,
        image_size=cfg.image_size,
        workers=cfg.workers,
        normalization=input_normalization(cfg.arch, cfg.weights),
        cache=default_cache_dir(cfg.cache_dir),
        log=log,
    )
    bundle = build_model(
        cfg.arch, len(data.classes), weights=cfg.weights, in_channels=data.in_channels, cache_dir=cfg.cache_dir, log=log
    )
    if cfg.frozen_prefix not in (None, "none"):
        data = freeze_prefix(bundle.net.backbone, data, cfg.frozen_prefix, default_cache_dir(cfg.cache_dir), log)
    return data, bundle


def build(cfg: FitConfig, rd: RunDir, info: fdist.DistInfo, log: Callable[[str], None]) -> Run:
    """The :class:`Run` of ``cfg`` in the held run directory ``rd`` (resumed from ``rd.checkpoint`` if any)."""
    ckpt = rd.checkpoint
    closers: list[Callable[[], None]] = []
    try:
        return _build(cfg, rd, ckpt, info, log, closers)
    except BaseException:
        for close in reversed(closers):
            close()
        raise


def _build(cfg, rd: RunDir, ckpt, info, log, closers) -> Run:
    recipes = build_recipes(cfg.method, parse_overrides(cfg.set), data=builtin_name(cfg.data) or cfg.data)
    closers.extend(r.close for r in recipes)
    cfg = resolve(cfg, default_weight_decay(recipes), cpu=info.device.type == "cpu")
    if ckpt is not None and ckpt["epoch"] > cfg.epochs:
        raise FineregError(
            f"{str(rd.path)!r} already holds {ckpt['epoch']} epochs, more than --epochs {cfg.epochs}; resume with "
            "at least as many epochs, or start a new run (another --out)"
        )
    torch.manual_seed(derive_seed(cfg.seed, 0xC0FFEE))  # new head init
    data, bundle = build_task(cfg, log)
    check_batch_size(len(data.train), cfg.batch_size)
    if note := dropped_note(len(data.train), cfg.batch_size):
        log(note)
    net = bundle.net.to(info.device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    _probe(net, data, bundle.arch)
    retention = None
    if net.source_head is not None and isinstance(data.test, TensorImages):  # before any recipe changes the net
        key = (cfg.data, cfg.arch, cfg.weights, cfg.image_size, cfg.frozen_prefix, cfg.cache_dir)
        retention = source_reference(net, data.test, key, info.device)
    for r in recipes:
        r.prepare(net)
    source = None
    if any(r.needs_source for r in recipes):
        source = copy.deepcopy(net).eval().requires_grad_(False)
        source.source_head_in_use = False
    autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
    steps = cfg.iters_per_epoch or len(data.train) // cfg.batch_size
    ctx = Context(
        net=net,
        data=data,
        dist=info,
        device=info.device,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        run_dir=rd.path,
        cache_dir=default_cache_dir(cfg.cache_dir),
        log=log,
        source=source,
        autocast=autocast,
        total_steps=cfg.epochs * steps,
    )
    if ckpt is not None:
        for r in recipes:
            r.load_state_dict(ckpt.get("recipes", {}).get(r.name, {}))
    model: nn.Module = net
    wrapper = next((r for r in recipes if type(r).wrap is not Recipe.wrap), None)
    if wrapper is not None:  # before the others' hooks: a wrapper's copies (Bi-Tuning's key encoder) carry none
        model = wrapper.wrap(net, ctx).to(info.device)
    fdist.barrier()
    for r in recipes:
        r.setup(ctx)
    if info.is_main:
        rd.begin(log)

    parts = wrapper.parts(model) if wrapper is not None else None  # else the parts the network declares
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.lr, parts, pretrained_lr_mult=cfg.backbone_lr_mult),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.momentum > 0,
    )
    for r in recipes:  # SPD / FTP / decoupled L2-SP wrap it, LP-FT lowers its lr, TPGM projects after its steps
        optimizer = r.wrap_optimizer(optimizer, ctx)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_steps, gamma=cfg.lr_gamma)
    start = {"start_epoch": 0, "start_step": 0, "meter_state": None, "rng": None}
    history: list[dict] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history = list(ckpt["history"])
        start = {"start_epoch": ckpt["epoch"], "start_step": ckpt["step"], "meter_state": ckpt.get("meter"),
                 "rng": ckpt.get("rng")}  # fmt: skip

    train_model = model
    if info.distributed:
        if cfg.batch_size % info.world_size:
            raise FineregError(
                f"batch_size {cfg.batch_size} (the global batch) must divide by the {info.world_size} processes"
            )
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
        # a size-1 dimension (1-channel input conv) makes equivalent strides differ; harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if cfg.compile:
        train_model = torch.compile(train_model)
    forward = (lambda b: wrapper.forward(train_model, b)) if wrapper is not None else (lambda b: train_model(b.x))

    if info.is_main:
        write_text_atomic(rd.path / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        log(
            f"fit: {cfg.method} on {data.name} ({len(data.train)} training images, {len(data.classes)} classes, "
            f"{cfg.sample_rate:g}% per class) | {bundle.arch} ({bundle.weights}) | {cfg.epochs} epochs x "
            f"{steps} steps x batch {cfg.batch_size} | " + ", ".join(map(repr, recipes))
        )
    logger = MetricsLogger(rd.path, history, enabled=info.is_main, tensorboard=cfg.tensorboard)
    closers.append(logger.close)
    return Run(
        cfg=cfg,
        info=info,
        run_dir=rd.path,
        data=data,
        net=net,
        model=model,
        train_model=train_model,
        recipes=recipes,
        ctx=ctx,
        optimizer=optimizer,
        scheduler=scheduler,
        logger=logger,
        steps=steps,
        log=log,
        forward=forward,
        views=max((r.views for r in recipes), default=1),
        autocast=autocast,
        closers=closers,
        retention=retention,
        **start,
    )
