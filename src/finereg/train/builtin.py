"""The built-in pretrained source model: :class:`BuiltinNet` (a small CNN for 8x8 digits) trained on digits 0-4 at four
rotations (20 source classes, see :func:`~finereg.train.data.digits_source`).

The engine's built-in transfer task fine-tunes it on digits 5-9 (see :mod:`finereg.train.data`). The source
model is trained by the project itself, deterministically (fixed seed, deterministic algorithms, one thread), in
about ten seconds on a CPU, and cached as ``<cache>/builtin-digits-src-v<N>-<hash>.pt``, where ``<cache>`` is
``$FINEREG_CACHE``, else ``$XDG_CACHE_HOME/finereg``, else ``~/.cache/finereg``. The file is written atomically
and rebuilt when missing or unreadable; the hash covers the recipe below, so changing it rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist as fdist
from .checkpoint import atomic_save
from .data import epoch_plan, stratified_subset
from .digits import digits_source

__all__ = ["BuiltinNet", "PRETRAIN", "cache_dir", "pretrained_path", "pretrain_source", "pretrained_state"]


class BuiltinNet(nn.Module):
    """The built-in small CNN for 8x8 digit images (about 0.1 M parameters).

    conv1 3x3 (in→w) · GroupNorm · ReLU → conv2 3x3 (w→2w) · GroupNorm · ReLU · max-pool 2 →
    conv3 3x3 (2w→4w) · GroupNorm · ReLU → global average pool → fc (4w→classes).

    GroupNorm instead of BatchNorm: no batch statistics, so a step under DistributedDataParallel equals the
    single-process step on the same global batch, and train and eval modes compute the same features.
    """

    def __init__(self, num_classes: int = 5, in_channels: int = 1, width: int = 32, groups: int = 8):
        super().__init__()
        w = width
        self.conv1, self.norm1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.GroupNorm(groups, w)
        self.conv2, self.norm2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.GroupNorm(groups, 2 * w)
        self.conv3, self.norm3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.GroupNorm(groups, 4 * w)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        x = F.relu(self.norm3(self.conv3(x)))
        return self.fc(self.pool(x))


# The recipe of the source model: SGD with momentum, cosine schedule, ±1 px translations.
PRETRAIN = {
    "version": 1,
    "epochs": 20,
    "batch_size": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "seed": 0,
    "holdout_percent": 15,
}


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where finereg caches files: ``explicit``, ``$FINEREG_CACHE``, ``$XDG_CACHE_HOME/finereg`` or
    ``~/.cache/finereg``."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("FINEREG_CACHE"):
        return Path(os.environ["FINEREG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finereg"


def pretrained_path(cache: str | os.PathLike | None = None) -> Path:
    """The cache file of the built-in source model for the current :data:`PRETRAIN` recipe."""
    key = hashlib.sha256(json.dumps(PRETRAIN, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir(cache) / f"builtin-digits-src-v{PRETRAIN['version']}-{key}.pt"


@contextmanager
def _deterministic():
    """Deterministic kernels on one thread (a reduction's order, so its rounding, depends on the thread count);
    the caller's RNG state is left as it was."""
    was, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)


def pretrain_source(log=print) -> tuple[dict, dict]:
    """Train the built-in network on the source task; returns (state_dict, info with the held-out accuracy)."""
    p = PRETRAIN
    t0 = time.perf_counter()
    with _deterministic():
        torch.manual_seed(p["seed"])
        src = digits_source()
        holdout = torch.zeros(len(src), dtype=torch.bool)
        holdout[stratified_subset(src.labels, p["holdout_percent"], p["seed"])] = True
        train, test = src.subset(torch.nonzero(~holdout).flatten()), src.subset(torch.nonzero(holdout).flatten())
        model = BuiltinNet(len(src.classes), src.in_channels)
        opt = torch.optim.SGD(
            model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"], nesterov=True
        )
        steps = len(train) // p["batch_size"]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p["epochs"] * steps)
        dev = torch.device("cpu")
        model.train()
        for epoch in range(p["epochs"]):
            order, seeds = epoch_plan(len(train), p["batch_size"], steps, p["seed"], epoch)
            for b in train.train_batches(order, seeds, 1, dev):
                loss = F.cross_entropy(model(b.x), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(b.x).argmax(1) == b.y).sum()) for b in test.eval_batches(256, dev))
    info = {
        "source_classes": src.classes,
        "holdout_accuracy": 100.0 * correct / len(test),
        "train_images": len(train),
        "seconds": time.perf_counter() - t0,
        "recipe": dict(p),
    }
    log(
        f"pretrained the built-in source model on digits 0-4 x 4 rotations in {info['seconds']:.1f}s "
        f"(held-out accuracy {info['holdout_accuracy']:.1f}%)"
    )
    return model.state_dict(), info


def pretrained_state(cache: str | os.PathLike | None = None, log=print) -> dict:
    """The built-in source model's state_dict, from the cache or trained now (and cached).

    Under torch.distributed rank 0 trains and writes it while the other ranks wait. The global random
    generator is left as it was, cold cache or warm, so that a run's weights do not depend on the cache's state.
    """
    path = pretrained_path(cache)
    with torch.random.fork_rng(devices=[]):  # checking or building the cache draws nothing from the run's stream
        if fdist.rank() == 0 and not _valid(path, log):
            log(f"building the built-in pretrained source model (cached at {path}) ...")
            state, info = pretrain_source(log)
            atomic_save({"state_dict": state, "info": info}, path)
    fdist.barrier()
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _valid(path: Path, log) -> bool:
    """Whether the cache file holds the built-in source model of the current recipe: readable, made with
    :data:`PRETRAIN`, and a state that loads into :class:`BuiltinNet` (a stale or foreign file is named, then
    rebuilt)."""
    if not path.is_file():
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"]
        if obj.get("info", {}).get("recipe") != PRETRAIN:
            raise ValueError("it was made with another pretraining recipe")
        BuiltinNet(state["fc.weight"].shape[0], state["conv1.weight"].shape[1]).load_state_dict(state)
        return True
    except Exception as e:  # unreadable, foreign or stale: torch and load_state_dict raise several types
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        log(f"cached source model {path} is unusable ({why}); rebuilding it")
        return False
