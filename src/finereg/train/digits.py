"""The built-in transfer task (the quick smoke protocol): scikit-learn's 1797 handwritten digits (8x8, 16 grey
levels, shipped with scikit-learn). The built-in network is pretrained on digits 0-4 at four rotations
(:func:`digits_source`, see :mod:`finereg.train.builtin`) and fine-tuned on digits 5-9 (:func:`digits_task`).

Splits of each target class, fixed by :data:`DIGITS_SPLIT_SEED` (never by a run's seeds), in a seeded random order
of the class: test = the first 2/3, validation = the next 10 % of the rest (for choosing settings), pool = the
rest, from which a run samples its training set (:func:`~finereg.train.data.stratified_subset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import MissingDependencyError
from .data import TensorImages, TrainData, class_ranks, stratified_subset

__all__ = ["digits_arrays", "digits_source", "digits_target", "digits_task", "DIGITS_MEAN", "DIGITS_STD"]

DIGITS_SOURCE = (0, 1, 2, 3, 4)  # the source task the built-in network is pretrained on
DIGITS_TARGET = (5, 6, 7, 8, 9)  # the target task it is fine-tuned on
DIGITS_TEST_FRACTION = 2 / 3  # fixed held-out share of each target class
DIGITS_VALID_FRACTION = 0.1  # share of the rest kept out of training for choosing settings
DIGITS_SPLIT_SEED = 0  # the splits never change with --seed or --data-seed
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of all 1797 images scaled to [0, 1]


def _images(images: Tensor, labels: Tensor, classes: Sequence[str]) -> TensorImages:
    return TensorImages(images, labels, classes, shift=1, mean=DIGITS_MEAN, std=DIGITS_STD)


def digits_arrays() -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits: images (1797, 1, 8, 8) in [0, 1] and labels 0-9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "the built-in 'digits' task needs scikit-learn: pip install 'finereg[train]'"
        ) from e
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(d.target, dtype=torch.long)


def _relabel(images: Tensor, labels: Tensor, keep: Sequence[int]) -> tuple[Tensor, Tensor]:
    keep_t = torch.tensor(list(keep))
    mask = torch.isin(labels, keep_t)
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup[keep_t] = torch.arange(len(keep_t))
    return images[mask], lookup[labels[mask]]


def digits_source() -> TensorImages:
    """The source task of the built-in network: digits 0-4, each shown at 4 rotations (0, 90, 180, 270 degrees),
    classified into 20 classes (digit x rotation, named ``'3_r90'``), 3604 images.

    Why the rotations: a network trained on the 5 upright classes alone collapses its features onto those
    5 classes and transfers worse than random features (a linear probe on digits 5-9 at 15 % of the data:
    85.3 % vs 87.1 % for a random network); with the orientation labels its features carry general stroke
    detectors (93.5 %). See docs/engine.md.
    """
    images, labels = _relabel(*digits_arrays(), DIGITS_SOURCE)
    images = torch.cat([torch.rot90(images, k, (2, 3)) for k in range(4)])
    labels = torch.cat([labels * 4 + k for k in range(4)])
    return _images(images, labels, [f"{d}_r{90 * k}" for d in DIGITS_SOURCE for k in range(4)])


def digits_target() -> tuple[TensorImages, TensorImages, TensorImages]:
    """The target task: digits 5-9 relabelled 0-4, as (training pool, validation split, test split)."""
    images, labels = _relabel(*digits_arrays(), DIGITS_TARGET)
    ds = _images(images, labels, [str(c) for c in DIGITS_TARGET])
    counts = torch.bincount(labels)
    n_test = torch.floor(counts.double() * DIGITS_TEST_FRACTION + 0.5).long()
    n_valid = torch.floor((counts - n_test).double() * DIGITS_VALID_FRACTION + 0.5).long()
    rank = class_ranks(labels, DIGITS_SPLIT_SEED)
    is_test = rank < n_test[labels]
    is_valid = ~is_test & (rank < (n_test + n_valid)[labels])
    pick = lambda mask: ds.subset(torch.nonzero(mask).flatten())  # noqa: E731
    return pick(~is_test & ~is_valid), pick(is_valid), pick(is_test)


def digits_task(sample_rate: float = 100, data_seed: int = 0) -> TrainData:
    """The built-in task's splits, the training set sampled to ``sample_rate`` percent of each class."""
    pool, valid, test = digits_target()
    index = stratified_subset(pool.labels, sample_rate, data_seed) if sample_rate < 100 else torch.arange(len(pool))
    train = pool.subset(index) if sample_rate < 100 else pool
    return TrainData("digits", train, test, pool.classes, valid=valid, pool=pool, train_index=index)
