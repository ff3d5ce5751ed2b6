"""Data primitives of the engine: batches, stratified sampling, epoch plans, in-memory image sets, a run's splits.

Determinism. Every random choice of an epoch (the order of the samples and each sample's augmentation) is drawn
from a generator seeded by ``(seed, epoch)`` in :func:`epoch_plan`: a table of sample indices and per-sample
seeds, one row per step. A run that resumes at epoch ``e`` draws the same table, and ``N`` distributed
processes cut each row into ``N`` equal slices, so together they see exactly the batch a single process sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import FineregError
from .._utils import class_ranks as _class_ranks

__all__ = [
    "Batch",
    "TensorImages",
    "TrainData",
    "class_ranks",
    "stratified_subset",
    "check_batch_size",
    "dropped_note",
    "epoch_plan",
    "derive_seed",
    "SAMPLE_RATES",
]

SAMPLE_RATES = (15, 30, 50, 100)


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (splitmix64 mixing), e.g. ``derive_seed(seed, epoch)``."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 2


@dataclass
class Batch:
    """One training or evaluation batch: inputs, labels, dataset indices and extra augmented views."""

    x: Tensor
    y: Tensor
    index: Tensor
    views: list[Tensor] = field(default_factory=list)  # further augmentations of the same samples (Bi-Tuning)
    skipped: int = 0  # unreadable images dropped from this batch


# ---------------------------------------------------------------------------------------------- sampling
def class_ranks(labels: Tensor, seed: int) -> Tensor:
    """Each sample's rank in a random order of its own class (0 = first), drawn from ``seed``
    (:func:`finereg._utils.class_ranks`). Taking the samples of rank < k_c keeps k_c samples of class c; the subsets
    for growing k are nested."""
    return _class_ranks(labels, generator=torch.Generator().manual_seed(derive_seed(seed)))


def stratified_subset(labels: Tensor, rate: float, seed: int) -> Tensor:
    """Indices of a stratified sample of ``rate`` percent of each class (at least one image per class).

    k_c = max(1, floor(n_c * rate / 100 + 0.5)); the samples are the first k_c of a seeded random order of the
    class, so 15 % ⊂ 30 % ⊂ 50 % ⊂ 100 % for the same seed.
    """
    if not 0 < rate <= 100:
        raise FineregError(f"sample rate must be in (0, 100] percent, got {rate}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels)
    keep = torch.clamp(torch.floor(counts.double() * rate / 100 + 0.5).long(), min=1)
    return torch.nonzero(class_ranks(labels, seed) < keep[labels]).flatten()


def dropped_note(n: int, batch_size: int) -> str | None:
    """What a log says where ``batch_size`` does not divide the ``n`` training images: each shuffled pass leaves
    ``n % batch_size`` of them out (a different few each pass; see :func:`epoch_plan`)."""
    left = n % batch_size
    if not left or n >= 10 * batch_size:  # on a large set a partial batch is noise
        return None
    return (
        f"note: batch {batch_size} does not divide the {n} training images: each pass over them leaves {left} out "
        f"(a different {left} each time, in the shuffled order); a batch size dividing {n} uses them all"
    )


def check_batch_size(n: int, batch_size: int) -> None:
    """A training set smaller than one batch cannot make a single step: say so."""
    if n < batch_size:
        raise FineregError(
            f"the training set has {n} images, fewer than one batch ({batch_size}); "
            "lower --batch-size or raise --sample-rate"
        )


def epoch_plan(n: int, batch_size: int, steps: int, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
    """The sample indices and per-sample augmentation seeds of every step of an epoch, shape (steps, batch).

    Indices run through consecutive random permutations of ``range(n)`` (every sample once per pass, as a
    shuffled loader with ``drop_last``); both tables are a function of ``(seed, epoch)`` only.
    """
    check_batch_size(n, batch_size)
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    total = steps * batch_size
    per_pass = n - n % batch_size  # drop_last within each pass
    passes = math.ceil(total / per_pass)
    order = torch.cat([torch.randperm(n, generator=g)[:per_pass] for _ in range(passes)])[:total]
    seeds = torch.randint(0, 2**62, (total,), generator=g)
    return order.view(steps, batch_size), seeds.view(steps, batch_size)


# ---------------------------------------------------------------------------------------------- in-memory
class TensorImages:
    """Images held in one tensor, augmented in batches by a random translation of up to ``shift`` pixels.

    ``images`` are raw values in [0, 1]; batches come out standardized with ``mean``/``std``. The translation
    of each sample is read from its seed in the epoch plan (vectorized gather, no loop over samples).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        *,
        shift: int = 1,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise FineregError(
                f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                f"and {tuple(labels.shape)} labels"
            )
        self.images, self.labels = images.float(), labels.long()
        self.classes, self.shift, self.mean, self.std = list(classes), shift, _stat(mean), _stat(std)
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def subset(self, indices: Tensor) -> TensorImages:
        return TensorImages(
            self.images[indices], self.labels[indices], self.classes, shift=self.shift, mean=self.mean, std=self.std
        )

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The images on ``device``, plain and zero-padded by ``shift`` (moved once, kept)."""
        if device not in self._cache:
            raw = self.images.to(device)
            p = self.shift
            self._cache[device] = (raw, torch.nn.functional.pad(raw, (p, p, p, p)))
        return self._cache[device]

    def _translate(self, padded: Tensor, seeds: Tensor, view: int) -> Tensor:
        if self.shift == 0:  # no augmentation
            return padded
        b, _, hp, wp = padded.shape
        h, w, span = hp - 2 * self.shift, wp - 2 * self.shift, 2 * self.shift + 1
        code = (seeds >> (16 * view)) & 0xFFFF
        dy, dx = (code % span).to(padded.device), (code // span % span).to(padded.device)
        rows = dy[:, None] + torch.arange(h, device=padded.device)
        cols = dx[:, None] + torch.arange(w, device=padded.device)
        out = padded[torch.arange(b, device=padded.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def _standardize(self, x: Tensor) -> Tensor:
        if isinstance(self.mean, float) and self.mean == 0.0 and self.std == 1.0:
            return x
        return (x - _on_device(self.mean, x)) / _on_device(self.std, x)

    def train_batches(self, order: Tensor, seeds: Tensor, views: int, device: torch.device) -> Iterator[Batch]:
        """Augmented batches for the rows of ``order`` / ``seeds`` (see :func:`epoch_plan`)."""
        padded = self._on(device)[1]
        for idx, s in zip(order, seeds):
            crops = padded[idx.to(device)]
            xs = [self._standardize(self._translate(crops, s, v)) for v in range(views)]
            yield Batch(xs[0], self.labels[idx].to(device), idx, xs[1:])

    def eval_batches(self, batch_size: int, device: torch.device, indices: Tensor | None = None) -> Iterator[Batch]:
        """Batches in order (all samples, or ``indices``), without augmentation."""
        raw = self._on(device)[0]
        for idx in (torch.arange(len(self)) if indices is None else indices).split(batch_size):
            yield Batch(self._standardize(raw[idx.to(device)]), self.labels[idx].to(device), idx)


def _stat(v: float | Sequence[float]) -> float | Tensor:
    """A normalization statistic: a float, or one value per channel as a (C, 1, 1) tensor."""
    if isinstance(v, (int, float)):
        return float(v)
    t = torch.as_tensor(list(v), dtype=torch.float32)
    return float(t[0]) if bool((t == t[0]).all()) else t.view(-1, 1, 1)


def _on_device(v: float | Tensor, x: Tensor) -> float | Tensor:
    return v.to(x.device) if isinstance(v, Tensor) else v


@dataclass
class TrainData:
    """The splits of a run: ``train`` (after sampling), ``test`` (the evaluation set every epoch reports; an
    ImageFolder's ``val/``, as in tllib), and where the data has them ``valid`` (a validation split carved from the
    training data, for choosing settings, never the test split) and ``shift`` (the test images under a
    distribution shift)."""

    name: str
    train: Any
    test: Any
    classes: list[str]
    skipped: int = 0  # unreadable images found and left out
    valid: Any | None = None
    shift: Any | None = None
    pool: Any | None = None  # in-memory tasks: all candidate training images; train = pool.subset(train_index)
    train_index: Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    def evaluation_sets(self) -> dict[str, Any]:
        """The sets each epoch evaluates, by metric prefix: ``test``, then ``valid`` and ``shift`` where present."""
        sets = {"test": self.test, "valid": self.valid, "shift": self.shift}
        return {k: v for k, v in sets.items() if v is not None}
