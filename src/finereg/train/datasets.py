"""Which data a run trains on: ``--data`` names a built-in task or an ImageFolder root (:func:`load_data`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._checks import MissingFileError
from .cifar10_task import cifar10_task
from .data import TrainData
from .digits import digits_task
from .folder import load_folder
from .real_task import REAL_TASKS, real_task

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

__all__ = ["BUILTIN_DATASETS", "builtin_name", "load_data"]

BUILTIN_DATASETS = ("digits", "cifar10", *REAL_TASKS)


def builtin_name(data: str) -> str | None:
    """The built-in task ``data`` names (``cifar10:DIR`` is CIFAR-10 read from the user's DIR), else ``None``."""
    if data in BUILTIN_DATASETS:
        return data
    return "cifar10" if str(data).startswith("cifar10:") else None


def load_data(
    data: str,
    *,
    sample_rate: float = 100,
    data_seed: int = 0,
    image_size: int = 224,
    workers: int = 2,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    cache: str | Path | None = None,
    log=print,
) -> TrainData:
    """A built-in task (``digits``: the quick smoke task of :func:`~finereg.train.digits.digits_task`;
    ``mnist5k``: the far-domain protocol's target of :func:`~finereg.train.real_task.real_task`; ``cifar10`` or
    ``cifar10:DIR``: the natural-image protocol of :func:`~finereg.train.cifar10_task.cifar10_task`, its corrupted
    test set cached under ``cache``) or an
    ImageFolder root (:func:`~finereg.train.folder.load_folder`); the training set keeps ``sample_rate`` percent of
    each class (stratified, seeded by ``data_seed``), the other splits are whole. ``normalization``: the
    ``(mean, std)`` the network expects of inputs in [0, 1] (ImageNet's if not given; the built-in digits task has
    its own)."""
    if data == "digits":
        return digits_task(sample_rate, data_seed)
    mean, std = normalization or (IMAGENET_MEAN, IMAGENET_STD)
    if builtin_name(data) == "cifar10":
        root = None if data == "cifar10" else data.partition(":")[2]
        return cifar10_task(
            root, sample_rate=sample_rate, data_seed=data_seed, image_size=image_size, mean=mean, std=std, cache=cache
        )
    if data in REAL_TASKS:
        return real_task(data, sample_rate=sample_rate, data_seed=data_seed, image_size=image_size, mean=mean, std=std)
    root = Path(data).expanduser()
    if not root.exists():
        raise MissingFileError(
            f"data {data!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing folder; "
            "give an ImageFolder root with train/<class>/<image> and val/<class>/<image>"
        )
    return load_folder(
        root,
        sample_rate=sample_rate,
        data_seed=data_seed,
        image_size=image_size,
        workers=workers,
        mean=mean,
        std=std,
        log=log,
    )
