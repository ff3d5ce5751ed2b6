"""Data for the engine: the built-in digits transfer task, ImageFolder roots, stratified sampling, epoch plans.

Determinism. Every random choice of an epoch (the order of the samples and each sample's augmentation) is drawn
from a generator seeded by ``(seed, epoch)`` in :func:`epoch_plan`: a table of sample indices and per-sample
seeds, one row per step. A run that resumes at epoch ``e`` draws the same table, and ``N`` distributed
processes cut each row into ``N`` equal slices, so together they see exactly the batch a single process sees.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._checks import FineregError, MissingDependencyError, MissingFileError

__all__ = [
    "Batch",
    "TensorImages",
    "FolderImages",
    "TrainData",
    "BUILTIN_DATASETS",
    "load_data",
    "digits_arrays",
    "digits_source",
    "digits_target",
    "class_ranks",
    "stratified_subset",
    "epoch_plan",
    "derive_seed",
    "SAMPLE_RATES",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

BUILTIN_DATASETS = ("digits",)
SAMPLE_RATES = (15, 30, 50, 100)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The built-in task: scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), shipped with scikit-learn.
DIGITS_SOURCE = (0, 1, 2, 3, 4)  # the source task the built-in network is pretrained on
DIGITS_TARGET = (5, 6, 7, 8, 9)  # the target task it is fine-tuned on
DIGITS_TEST_FRACTION = 2 / 3  # fixed held-out share of each target class
DIGITS_SPLIT_SEED = 0  # the test split never changes with --seed or --data-seed
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of all 1797 images scaled to [0, 1]


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
    """Each sample's rank in a random order of its own class (0 = first), drawn from ``seed``.

    Taking the samples of rank < k_c keeps k_c samples of class c; the subsets for growing k are nested.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    g = torch.Generator().manual_seed(derive_seed(seed))
    perm = torch.randperm(n, generator=g)
    perm = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within a class
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty(n, dtype=torch.long)
    ranks[perm] = torch.arange(n) - starts[labels[perm]]
    return ranks


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
        mean: float = DIGITS_MEAN,
        std: float = DIGITS_STD,
    ):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise FineregError(
                f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                f"and {tuple(labels.shape)} labels"
            )
        self.images, self.labels = images.float(), labels.long()
        self.classes, self.shift, self.mean, self.std = list(classes), shift, mean, std
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
        b, _, hp, wp = padded.shape
        h, w, span = hp - 2 * self.shift, wp - 2 * self.shift, 2 * self.shift + 1
        code = (seeds >> (16 * view)) & 0xFFFF
        dy, dx = (code % span).to(padded.device), (code // span % span).to(padded.device)
        rows = dy[:, None] + torch.arange(h, device=padded.device)
        cols = dx[:, None] + torch.arange(w, device=padded.device)
        out = padded[torch.arange(b, device=padded.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def _standardize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

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
    return TensorImages(images, labels, [f"{d}_r{90 * k}" for d in DIGITS_SOURCE for k in range(4)])


def digits_target() -> tuple[TensorImages, TensorImages]:
    """The target task: digits 5-9 relabelled 0-4, as (train pool, fixed held-out test half)."""
    images, labels = _relabel(*digits_arrays(), DIGITS_TARGET)
    ds = TensorImages(images, labels, [str(c) for c in DIGITS_TARGET])
    counts = torch.bincount(labels)
    n_test = torch.floor(counts.double() * DIGITS_TEST_FRACTION + 0.5).long()
    is_test = class_ranks(labels, DIGITS_SPLIT_SEED) < n_test[labels]
    return ds.subset(torch.nonzero(~is_test).flatten()), ds.subset(torch.nonzero(is_test).flatten())


# ---------------------------------------------------------------------------------------------- ImageFolder
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
    ``size``, random horizontal flip, ImageNet normalization; evaluation resizes and center-crops. Each sample's
    augmentation is seeded from the epoch plan, so it does not depend on the number of workers or processes.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], *, image_size: int = 224, workers: int = 2
    ):
        from torchvision import transforms as T

        self.samples, self.classes, self.image_size, self.workers = list(samples), list(classes), image_size, workers
        self.labels = torch.tensor([c for _, c in self.samples], dtype=torch.long)
        resize = round(image_size * 256 / 224)
        norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        self.train_transform = T.Compose(
            [T.Resize((resize, resize)), T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
        )
        self.eval_transform = T.Compose([T.Resize((resize, resize)), T.CenterCrop(image_size), T.ToTensor(), norm])

    def __len__(self) -> int:
        return len(self.samples)

    in_channels = 3

    def subset(self, indices: Tensor) -> FolderImages:
        return FolderImages(
            [self.samples[i] for i in indices.tolist()], self.classes, image_size=self.image_size, workers=self.workers
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


# ---------------------------------------------------------------------------------------------- entry point
@dataclass
class TrainData:
    """The training set (after sampling), the evaluation set and their classes."""

    name: str
    train: TensorImages | FolderImages
    val: TensorImages | FolderImages
    classes: list[str]
    skipped: int = 0  # unreadable images found and left out

    @property
    def in_channels(self) -> int:
        return self.train.in_channels


def load_data(
    data: str, *, sample_rate: float = 100, data_seed: int = 0, image_size: int = 224, workers: int = 2, log=print
) -> TrainData:
    """A built-in dataset name (``digits``) or an ImageFolder root with ``train/`` and ``val/`` sub-folders.

    The training set keeps ``sample_rate`` percent of each class (:func:`stratified_subset` with ``data_seed``);
    the evaluation set is whole. Unreadable images are left out, counted and reported through ``log``.
    """
    if data in BUILTIN_DATASETS:
        pool, test = digits_target()
        train = pool.subset(stratified_subset(pool.labels, sample_rate, data_seed)) if sample_rate < 100 else pool
        return TrainData(data, train, test, pool.classes)
    root = Path(data).expanduser()
    if not root.exists():
        raise MissingFileError(
            f"data {data!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor "
            "an existing folder; give an ImageFolder root with train/<class>/<image> and "
            "val/<class>/<image>"
        )
    if not root.is_dir():
        raise FineregError(f"data {data!r} is a file; give an ImageFolder root folder with train/ and val/")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())
        raise MissingFileError(
            f"{str(root)!r} has no {' or '.join(s + '/' for s in missing)} folder (found: "
            f"{found or 'nothing'}); expected {root}/train/<class>/<image> and {root}/val/..."
        )
    (tc, ts, tbad), (vc, vs, vbad) = scan_folder(root / "train"), scan_folder(root / "val")
    if tc != vc:
        only_t, only_v = sorted(set(tc) - set(vc)), sorted(set(vc) - set(tc))
        raise FineregError(
            f"train/ and val/ of {str(root)!r} have different classes: only in train/: {only_t}; "
            f"only in val/: {only_v}. Both must hold the same class folders"
        )
    bad = tbad + vbad
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        msg = f"skipped {len(bad)} unreadable image(s) in {root}: {shown}"
        log(msg)
    for split, samples in (("train", ts), ("val", vs)):
        if not samples:
            raise FineregError(
                f"{str(root / split)!r} holds no readable images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
    if len(tc) < 2:
        raise FineregError(
            f"{str(root / 'train')!r} has one class folder ({tc[0]!r}): a classifier of one class is always right "
            "(its accuracy would read 100 %). Give at least two class folders"
        )
    counts = torch.bincount(torch.tensor([c for _, c in ts]), minlength=len(tc))
    empty = [tc[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise FineregError(
            f"class folder(s) {empty} of {root / 'train'} hold no readable images; every class "
            "needs at least one training image"
        )
    full = FolderImages(ts, tc, image_size=image_size, workers=workers)
    train = full.subset(stratified_subset(full.labels, sample_rate, data_seed)) if sample_rate < 100 else full
    return TrainData(str(root), train, FolderImages(vs, vc, image_size=image_size, workers=workers), tc, len(bad))
