"""The CIFAR-10 protocol's data as the engine trains on it (:func:`cifar10_task`): the fixed splits of
:mod:`finereg.train.cifar10` at the protocol's resolution, the training sample of a run, and the shifted test set:
**CIFAR-10-C** (Hendrycks & Dietterich, ICLR 2019) drawn once from the test split.

The shifted test set. Test image i gets one corruption c_i of :data:`SHIFT_CORRUPTIONS` and one severity
s_i ∈ {1..5}, both uniform, from row i of a table drawn by ``torch.Generator().manual_seed(SHIFT_SEED)``
(:func:`cifar10_c_draw`), and is corrupted at its native 32 px by :func:`finereg.corruptions.corrupt_many` with
image i's own seeded generator; then it is resized like the clean image. So every run of every method is scored on
the same corrupted images, and one corrupted image per test image keeps the cost at one more evaluation pass. The
draw covers the 15 benchmark corruptions but frost, whose official photographs finereg does not ship
(:mod:`finereg.corruptions`): 14 corruptions × 5 severities. The corrupted images are made once and cached on disk
(``<cache>/cifar10c/<hash>.npy``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .._utils import atomic_write
from .cifar10 import CIFAR10_CLASSES, cifar10_splits, load_cifar10, to_float_images
from .data import TensorImages, TrainData, stratified_subset

__all__ = [
    "cifar10_task",
    "cifar10_c_draw",
    "corrupted_test_images",
    "CIFAR10_SPLIT",
    "SHIFT_CORRUPTIONS",
    "SHIFT_SEED",
]

# per class: the official test split's first 300 in a seeded order (3,000 test images), a validation split of 100
# and a pool of 100 from the official training split (docs/protocol.md says why)
CIFAR10_SPLIT = {"test_per_class": 300, "val_per_class": 100, "pool_per_class": 100}
SHIFT_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
SHIFT_SEED = 20190506  # the seed of the protocol's corrupted test set
_VERSION = 1


def cifar10_c_draw(n: int, seed: int = SHIFT_SEED) -> tuple[list[str], np.ndarray]:
    """The corruption name and severity (1..5) of each of ``n`` test images: row i of one seeded ``(n, 2)`` table,
    so the first m images of a longer set get the same draw as a set of m images."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    which = (u[:, 0] * len(SHIFT_CORRUPTIONS)).long().clamp_(max=len(SHIFT_CORRUPTIONS) - 1)
    severity = (u[:, 1] * 5).long().clamp_(max=4) + 1
    return [SHIFT_CORRUPTIONS[i] for i in which.tolist()], severity.numpy()


def corrupted_test_images(images: np.ndarray, cache: str | Path | None, seed: int = SHIFT_SEED) -> np.ndarray:
    """``images`` (uint8 ``(N, 32, 32, 3)``) each under its drawn corruption (:func:`cifar10_c_draw`), read from
    the disk cache when made before (keyed by the images, the draw and the version of this recipe)."""
    from ..corruptions import corrupt_many

    names, severities = cifar10_c_draw(len(images), seed)
    h = hashlib.sha256(f"finereg-cifar10c-v{_VERSION}:{seed}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    path = None if cache is None else Path(cache) / "cifar10c" / f"{h.hexdigest()[:20]}.npy"
    if path is not None and path.is_file():
        try:
            out = np.load(path, allow_pickle=False)
            if out.shape == images.shape and out.dtype == np.uint8:
                return out
        except (OSError, ValueError):
            pass  # a damaged cache file: made again below
    with torch.random.fork_rng(devices=[]):  # nothing here may touch a run's random stream
        out = corrupt_many(np.ascontiguousarray(images), names, severities, seed)
    if path is not None:
        atomic_write(path, lambda f: np.save(f, out, allow_pickle=False))
    return out


def cifar10_task(
    root: str | None = None,
    *,
    sample_rate: float = 100,
    data_seed: int = 0,
    image_size: int = 96,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    cache: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> TrainData:
    """The CIFAR-10 protocol's data (``root=None``: the packaged files; else the user's copy, see
    :func:`~finereg.train.cifar10.load_cifar10`): ``sample_rate`` percent of each class of the pool for training
    (seeded by ``data_seed``), the validation and test splits, and the corrupted test set, at ``image_size``,
    standardized with ``mean`` / ``std``, without augmentation."""
    pool, valid, test, shift = _splits(root, image_size, tuple(mean), tuple(std), None if cache is None else str(cache))
    train_index = stratified_subset(pool.labels, sample_rate, data_seed)
    full = sample_rate >= 100
    return TrainData(
        "cifar10" if root is None else f"cifar10:{root}",
        pool if full else pool.subset(train_index),
        test,
        list(CIFAR10_CLASSES),
        valid=valid,
        shift=shift,
        pool=pool,
        train_index=torch.arange(len(pool)) if full else train_index,
    )


@functools.lru_cache(maxsize=2)
def _splits(root, image_size: int, mean: tuple, std: tuple, cache) -> tuple[TensorImages, ...]:
    """The pool, validation, test and corrupted test images (made once per process; never modified in place)."""
    d = load_cifar10(root)
    s = cifar10_splits(d, **CIFAR10_SPLIT)
    test_u8 = d.test_images[s.test.numpy()]

    def images(u8: np.ndarray, labels: np.ndarray) -> TensorImages:
        x = to_float_images(u8, image_size)
        return TensorImages(x, torch.from_numpy(labels), list(CIFAR10_CLASSES), shift=0, mean=mean, std=std)

    return (
        images(d.train_images[s.pool.numpy()], d.train_labels[s.pool.numpy()]),
        images(d.train_images[s.val.numpy()], d.train_labels[s.val.numpy()]),
        images(test_u8, d.test_labels[s.test.numpy()]),
        images(corrupted_test_images(test_u8, cache), d.test_labels[s.test.numpy()]),
    )
