"""The real-backbone protocol's data as the engine trains on it (:func:`real_task`): the fixed splits of a target
set of :mod:`finereg.train.imagenet_task` at the protocol's resolution, the training sample of a run, and the
shifted test set of :mod:`finereg.train.shift`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import TensorImages, TrainData, stratified_subset
from .imagenet_task import resize_images, split_target_set
from .shift import shifted

__all__ = ["real_task", "REAL_TASKS"]

REAL_TASKS = ("mnist5k",)


def real_task(
    name: str = "mnist5k",
    *,
    sample_rate: float = 100,
    data_seed: int = 0,
    image_size: int = 32,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
) -> TrainData:
    """The real-backbone protocol's data as the engine trains on it: the fixed splits of the target set ``name``
    at ``image_size`` (no augmentation), ``sample_rate`` percent of each class of the pool for training (seeded
    by ``data_seed``), and the shifted test set. Grey images stay one channel when the normalization is the same
    for every channel (the network's stem is folded to one input channel, the same function), else they are
    repeated to three."""
    splits = split_target_set(name)
    d = splits.data
    mean, std = tuple(mean), tuple(std)
    channels = 1 if len(set(mean)) == 1 and len(set(std)) == 1 else 3

    def images(x: Tensor, idx: Tensor) -> TensorImages:
        x = x.expand(-1, channels, -1, -1).contiguous() if channels != x.shape[1] else x
        return TensorImages(x, d.labels[idx], list(d.classes), shift=0, mean=mean[:channels], std=std[:channels])

    pool = images(resize_images(d.images[splits.pool], image_size), splits.pool)
    train_index = stratified_subset(pool.labels, sample_rate, data_seed)
    return TrainData(
        name,
        pool.subset(train_index) if sample_rate < 100 else pool,
        images(resize_images(d.images[splits.test], image_size), splits.test),
        list(d.classes),
        valid=images(resize_images(d.images[splits.val], image_size), splits.val),
        shift=images(shifted(d.images[splits.test], image_size), splits.test),
        pool=pool,
        train_index=train_index if sample_rate < 100 else torch.arange(len(pool)),
    )
