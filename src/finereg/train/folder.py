"""ImageFolder data: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (the test split, as in
tllib), optionally ``ROOT/valid/<class>/<image>`` (a validation split kept out of training, for choosing
settings). Images are read with PIL (converted to RGB) and augmented per sample with torchvision; each sample's
augmentation is seeded from the epoch plan, so it does not depend on the number of workers or processes.
Unreadable images are left out, counted and reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._checks import FineregError, MissingFileError
from .data import Batch, TrainData, derive_seed, stratified_subset

__all__ = ["FolderImages", "scan_folder", "load_folder", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class _SeededImages(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` items: the image at ``index`` through the transform, its randomness from ``seed``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, views: int):
        self.samples, self.transform, self.views = samples, transform, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int | None]):
        from PIL import Image

        index, seed = item
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError):
            return None  # unreadable: dropped from the batch and counted
        if seed is None:
            return self.transform(img), label, index
        xs = []
        with torch.random.fork_rng(devices=[]):
            for v in range(self.views):
                torch.manual_seed(derive_seed(seed, v))
                xs.append(self.transform(img))
        return xs, label, index


def _collate(items: list) -> Batch:
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(
            torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped=skipped
        )
    xs, ys, idx = zip(*good)
    y, index = torch.tensor(ys), torch.tensor(idx)
    if isinstance(xs[0], list):
        views = [torch.stack([x[v] for x in xs]) for v in range(len(xs[0]))]
        return Batch(views[0], y, index, views[1:], skipped)
    return Batch(torch.stack(xs), y, index, [], skipped)


class FolderImages:
    """Images in class folders, read with PIL (converted to RGB), augmented per sample with torchvision.

    Training augmentation follows tllib's default: resize to ``size·256/224`` square, random resized crop to
    ``size``, random horizontal flip, the network's normalization (``mean``/``std``, ImageNet's by default);
    evaluation resizes and center-crops. Each sample's
    augmentation is seeded from the epoch plan, so it does not depend on the number of workers or processes.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        *,
        image_size: int = 224,
        workers: int = 2,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        from torchvision import transforms as T

        self.samples, self.classes, self.image_size, self.workers = list(samples), list(classes), image_size, workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.labels = torch.tensor([c for _, c in self.samples], dtype=torch.long)
        resize = round(image_size * 256 / 224)
        norm = T.Normalize(mean=list(self.mean), std=list(self.std))
        self.train_transform = T.Compose(
            [T.Resize((resize, resize)), T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
        )
        self.eval_transform = T.Compose([T.Resize((resize, resize)), T.CenterCrop(image_size), T.ToTensor(), norm])

    def __len__(self) -> int:
        return len(self.samples)

    in_channels = 3

    def subset(self, indices: Tensor) -> FolderImages:
        return FolderImages(
            [self.samples[i] for i in indices.tolist()],
            self.classes,
            image_size=self.image_size,
            workers=self.workers,
            mean=self.mean,
            std=self.std,
        )

    def _loader(self, transform, views: int, batches: list[list[tuple[int, int | None]]]):
        return torch.utils.data.DataLoader(
            _SeededImages(self.samples, transform, views),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            persistent_workers=False,
        )

    def train_batches(self, order: Tensor, seeds: Tensor, views: int, device: torch.device) -> Iterator[Batch]:
        batches = [list(zip(o.tolist(), s.tolist())) for o, s in zip(order, seeds)]
        for b in self._loader(self.train_transform, views, batches):
            yield _to(b, device)

    def eval_batches(self, batch_size: int, device: torch.device, indices: Tensor | None = None) -> Iterator[Batch]:
        idx = torch.arange(len(self)) if indices is None else indices
        batches = [[(i, None) for i in chunk.tolist()] for chunk in idx.split(batch_size)]
        for b in self._loader(self.eval_transform, 1, batches):
            yield _to(b, device)


def _to(b: Batch, device: torch.device) -> Batch:
    return Batch(
        b.x.to(device, non_blocking=True),
        b.y.to(device),
        b.index,
        [v.to(device, non_blocking=True) for v in b.views],
        b.skipped,
    )


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def scan_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Classes (sorted sub-folders), readable ``(path, class)`` samples and unreadable paths of ``split_dir``."""
    from concurrent.futures import ThreadPoolExecutor

    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise MissingFileError(f"{str(split_dir)!r} has no class folders; expected {split_dir}/<class>/<image>")
    files = [
        (str(p), c)
        for c, name in enumerate(classes)
        for p in sorted((split_dir / name).rglob("*"))
        if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
    ]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        ok = list(pool.map(_readable, (p for p, _ in files)))
    samples = [f for f, good in zip(files, ok) if good]
    bad = [p for (p, _), good in zip(files, ok) if not good]
    return classes, samples, bad


def load_folder(
    root: Path,
    *,
    sample_rate: float = 100,
    data_seed: int = 0,
    image_size: int = 224,
    workers: int = 2,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    log=print,
) -> TrainData:
    """The splits of an ImageFolder root (see the module docstring); the training set keeps ``sample_rate``
    percent of each class."""
    if not root.is_dir():
        raise FineregError(f"data {str(root)!r} is a file; give an ImageFolder root folder with train/ and val/")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())
        raise MissingFileError(
            f"{str(root)!r} has no {' or '.join(s + '/' for s in missing)} folder (found: "
            f"{found or 'nothing'}); expected {root}/train/<class>/<image> and {root}/val/..."
        )
    splits = ["train", "val"] + (["valid"] if (root / "valid").is_dir() else [])
    scanned = {s: scan_folder(root / s) for s in splits}
    tc = scanned["train"][0]
    for split in splits[1:]:
        other = scanned[split][0]
        if other != tc:
            only_t, only_o = sorted(set(tc) - set(other)), sorted(set(other) - set(tc))
            raise FineregError(
                f"train/ and {split}/ of {str(root)!r} have different classes: only in train/: {only_t}; "
                f"only in {split}/: {only_o}. They must hold the same class folders"
            )
    bad = [p for s in splits for p in scanned[s][2]]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        log(f"skipped {len(bad)} unreadable image(s) in {root}: {shown}")
    for split in splits:
        if not scanned[split][1]:
            raise FineregError(
                f"{str(root / split)!r} holds no readable images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
    if len(tc) < 2:
        raise FineregError(
            f"{str(root / 'train')!r} has one class folder ({tc[0]!r}): a classifier of one class is always right "
            "(its accuracy would read 100 %). Give at least two class folders"
        )
    ts = scanned["train"][1]
    counts = torch.bincount(torch.tensor([c for _, c in ts]), minlength=len(tc))
    empty = [tc[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise FineregError(
            f"class folder(s) {empty} of {root / 'train'} hold no readable images; every class "
            "needs at least one training image"
        )
    sets = {
        s: FolderImages(scanned[s][1], tc, image_size=image_size, workers=workers, mean=mean, std=std) for s in splits
    }
    full = sets["train"]
    train = full.subset(stratified_subset(full.labels, sample_rate, data_seed)) if sample_rate < 100 else full
    return TrainData(str(root), train, sets["val"], tc, len(bad), valid=sets.get("valid"))
