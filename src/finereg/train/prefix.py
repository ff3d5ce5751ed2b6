"""A frozen, cached prefix of the network: train only what comes after it, on its outputs computed once per image.

With ``frozen_prefix="blocks.K"`` on a timm EfficientNet / MobileNet-style network (``conv_stem``, ``bn1``,
``blocks``), :func:`freeze_prefix` takes the stem and blocks ``0..K`` out of the network (it keeps them, in eval
mode, without gradients, at their pretrained values), computes their output for every image of every split of an
in-memory task once — cached on disk and shared by all runs of a bench — and returns the task with those outputs
as its images. The network keeps the names of everything after the prefix (``backbone.blocks.3...``), so L2-SP
anchors, DELTA layers and checkpoints name the same tensors as in the whole network.

Exactly equivalent to fine-tuning the whole network with the prefix frozen (its BatchNorm in eval mode) and no
input augmentation, at a fraction of the cost: the prefix's forward is paid once per image instead of once per
step, and its backward never.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .._checks import FineregError
from .._utils import atomic_write
from .data import TensorImages, TrainData

__all__ = ["freeze_prefix", "split_prefix"]

_VERSION = 1


def split_prefix(backbone: nn.Module, at: str) -> nn.Sequential:
    """Take the stem and ``blocks.0`` .. ``blocks.K`` (``at = "blocks.K"``) out of ``backbone`` (replaced by
    ``nn.Identity``) and return them as one frozen module in eval mode."""
    blocks = getattr(backbone, "blocks", None)
    if not all(hasattr(backbone, n) for n in ("conv_stem", "bn1")) or not isinstance(blocks, nn.Sequential):
        raise FineregError(
            f"frozen_prefix works on timm EfficientNet / MobileNet-style networks (conv_stem, bn1, blocks); "
            f"{type(backbone).__name__} is not one. Drop --frozen-prefix"
        )
    head, dot, index = at.partition(".")
    if head != "blocks" or not dot or not index.isdigit() or int(index) >= len(blocks) - 1:
        raise FineregError(
            f"frozen_prefix must be 'blocks.K' with K in 0..{len(blocks) - 2} (the last block stays trainable), "
            f"got {at!r}"
        )
    k = int(index)
    prefix = nn.Sequential(backbone.conv_stem, backbone.bn1, *blocks[: k + 1])
    backbone.conv_stem, backbone.bn1 = nn.Identity(), nn.Identity()
    for i in range(k + 1):
        blocks[i] = nn.Identity()
    return prefix.eval().requires_grad_(False)


def _digest(prefix: nn.Module, images: TensorImages, at: str) -> str:
    h = hashlib.sha256(f"finereg-prefix-v{_VERSION}:{at}".encode())
    for name, t in prefix.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in (images.images, torch.as_tensor(images.mean), torch.as_tensor(images.std)):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def _features(prefix: nn.Module, images: TensorImages, batch: int = 256) -> Tensor:
    x = images._standardize(images.images)
    return torch.cat([prefix(x[i : i + batch]) for i in range(0, len(x), batch)]).contiguous()


_MEMO: dict[str, Tensor] = {}  # this process's last prefix outputs (a bench worker runs many fits)


def _cached(prefix: nn.Module, images: TensorImages, at: str, cache: Path, log: Callable[[str], None]) -> Tensor:
    key = _digest(prefix, images, at)
    if key in _MEMO:
        return _MEMO[key]
    path = cache / "prefix" / f"{key}.pt"
    feats = None
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises several types for a damaged file: compute it again
            log(f"cached prefix outputs {path} are unreadable; computing them again")
    if feats is None:
        with torch.random.fork_rng(devices=[]):  # computed or read, the run's random stream is the same
            feats = _features(prefix, images)
        atomic_write(path, lambda f: torch.save(feats, f))
    if len(_MEMO) >= 8:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = feats
    return feats


def freeze_prefix(
    backbone: nn.Module, data: TrainData, at: str, cache: str | os.PathLike, log: Callable[[str], None] = print
) -> TrainData:
    """Freeze ``backbone``'s prefix up to ``at`` (:func:`split_prefix`) and return ``data`` with each split's
    images replaced by the prefix's outputs (cached under ``cache/prefix``). ``data`` must be an in-memory task
    whose training set is ``pool.subset(train_index)``."""
    if data.pool is None or not isinstance(data.pool, TensorImages):
        raise FineregError(
            f"frozen_prefix needs an in-memory task (the built-in tasks); {data.name!r} is read from files. "
            "Drop --frozen-prefix"
        )
    prefix = split_prefix(backbone, at).to(torch.device("cpu"))
    cache = Path(cache)

    def through(images: TensorImages) -> TensorImages:
        feats = _cached(prefix, images, at, cache, log)
        return TensorImages(feats, images.labels, images.classes, shift=0)

    pool = through(data.pool)
    sets = {k: through(v) for k, v in data.evaluation_sets().items()}
    return TrainData(
        data.name,
        pool.subset(data.train_index),
        sets["test"],
        data.classes,
        data.skipped,
        valid=sets.get("valid"),
        shift=sets.get("shift"),
        pool=pool,
        train_index=data.train_index,
    )
