"""Which data a run trains on: ``--data`` names a built-in task or an ImageFolder root (:func:`load_data`)."""

from __future__ import annotations

from pathlib import Path

from .._checks import MissingFileError
from .data import TrainData
from .digits import digits_task
from .folder import load_folder

__all__ = ["BUILTIN_DATASETS", "load_data"]

BUILTIN_DATASETS = ("digits",)


def load_data(
    data: str, *, sample_rate: float = 100, data_seed: int = 0, image_size: int = 224, workers: int = 2, log=print
) -> TrainData:
    """A built-in task (``digits``: :func:`~finereg.train.digits.digits_task`) or an ImageFolder root
    (:func:`~finereg.train.folder.load_folder`); the training set keeps ``sample_rate`` percent of each class
    (stratified, seeded by ``data_seed``), the other splits are whole."""
    if data in BUILTIN_DATASETS:
        return digits_task(sample_rate, data_seed)
    root = Path(data).expanduser()
    if not root.exists():
        raise MissingFileError(
            f"data {data!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing folder; "
            "give an ImageFolder root with train/<class>/<image> and val/<class>/<image>"
        )
    return load_folder(
        root, sample_rate=sample_rate, data_seed=data_seed, image_size=image_size, workers=workers, log=log
    )
