"""Data of the engine: sampling, epoch plans, augmentation, the built-in task, ImageFolder roots."""

import pytest
import torch

from finereg._checks import FineregError
from finereg.train.data import TensorImages, class_ranks, derive_seed, epoch_plan, stratified_subset
from finereg.train.datasets import load_data
from finereg.train.digits import (
    DIGITS_TEST_FRACTION,
    DIGITS_VALID_FRACTION,
    digits_arrays,
    digits_source,
    digits_target,
)
from tests.train._util import image_folder, png


def test_stratified_subset_counts_nested_and_seeded():
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 7)
    subsets = {r: stratified_subset(labels, r, seed=3) for r in (15, 30, 50, 100)}
    counts = {r: torch.bincount(labels[s], minlength=3).tolist() for r, s in subsets.items()}
    assert counts[15] == [6, 3, 1]  # floor(n * 0.15 + 0.5), at least one
    assert counts[30] == [12, 6, 2]
    assert counts[50] == [20, 10, 4]
    assert counts[100] == [40, 20, 7]
    for small, big in ((15, 30), (30, 50), (50, 100)):
        assert set(subsets[small].tolist()) <= set(subsets[big].tolist())
    assert torch.equal(stratified_subset(labels, 30, seed=3), subsets[30])
    assert not torch.equal(stratified_subset(labels, 30, seed=4), subsets[30])
    with pytest.raises(ValueError, match="sample rate"):
        stratified_subset(labels, 0, seed=0)


def test_class_ranks_are_a_permutation_within_each_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    ranks = class_ranks(labels, seed=1)
    for c in range(3):
        assert sorted(ranks[labels == c].tolist()) == list(range(int((labels == c).sum())))


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    order, seeds = epoch_plan(10, 4, steps=5, seed=7, epoch=2)
    assert order.shape == seeds.shape == (5, 4)
    # every pass of 8 (= 10 with drop_last) draws 8 distinct samples
    flat = order.flatten()
    assert len(set(flat[:8].tolist())) == 8 and len(set(flat[8:16].tolist())) == 8
    again = epoch_plan(10, 4, steps=5, seed=7, epoch=2)
    assert torch.equal(order, again[0]) and torch.equal(seeds, again[1])
    assert not torch.equal(order, epoch_plan(10, 4, steps=5, seed=7, epoch=3)[0])
    assert not torch.equal(order, epoch_plan(10, 4, steps=5, seed=8, epoch=2)[0])
    with pytest.raises(ValueError, match="fewer than one batch"):
        epoch_plan(3, 4, steps=1, seed=0, epoch=0)
    assert derive_seed(1, 2) != derive_seed(2, 1) and 0 <= derive_seed(5) < 2**62


def test_translation_augmentation_matches_per_sample_crops():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 2, 5, 7, generator=g)
    ds = TensorImages(images, torch.arange(6) % 3, ["a", "b", "c"], shift=1, mean=0.0, std=1.0)
    order = torch.arange(6).view(1, 6)
    seeds = torch.randint(0, 2**62, (1, 6), generator=g)
    batch = next(ds.train_batches(order, seeds, views=2, device=torch.device("cpu")))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for v, x in enumerate([batch.x, *batch.views]):
        for i in range(6):  # reference: an explicit crop per sample
            code = (int(seeds[0, i]) >> (16 * v)) & 0xFFFF
            dy, dx = code % 3, code // 3 % 3
            assert torch.equal(x[i], padded[i, :, dy : dy + 5, dx : dx + 7])
    ev = next(ds.eval_batches(4, torch.device("cpu")))
    assert torch.equal(ev.x, images[:4]) and ev.index.tolist() == [0, 1, 2, 3]


def test_digits_task_splits():
    images, labels = digits_arrays()
    assert images.shape == (1797, 1, 8, 8) and float(images.max()) == 1.0
    pool, valid, test = digits_target()
    assert pool.classes == valid.classes == test.classes == ["5", "6", "7", "8", "9"]
    assert len(pool) + len(valid) + len(test) == int((labels >= 5).sum())
    n_test, n_valid, n_pool = (torch.bincount(d.labels).double() for d in (test, valid, pool))
    share = lambda a, b: a / (a + b)  # noqa: E731
    assert torch.allclose(share(n_test, n_valid + n_pool), torch.full((5,), DIGITS_TEST_FRACTION).double(), atol=0.01)
    assert torch.allclose(share(n_valid, n_pool), torch.full((5,), DIGITS_VALID_FRACTION).double(), atol=0.02)
    # the three splits are disjoint (no image of one is in another, but for images the dataset holds twice)
    flat = lambda ds: {tuple(x.flatten().tolist()) for x in ds.images}  # noqa: E731
    dup = _duplicated_images(images)
    assert not (flat(pool) & flat(test)) - dup and not (flat(pool) & flat(valid)) - dup
    assert not (flat(valid) & flat(test)) - dup
    src = digits_source()
    assert len(src) == 4 * int((labels < 5).sum()) and len(src.classes) == 20 and src.classes[1] == "0_r90"
    # label d*4+k is digit d rotated k quarter turns
    i = int(torch.nonzero(src.labels == 4 * 3 + 1)[0])
    assert any(torch.equal(src.images[i], torch.rot90(x, 1, (1, 2))) for x in images[labels == 3])


def _duplicated_images(images):
    seen, dup = set(), set()
    for x in images:
        key = tuple(x.flatten().tolist())
        (dup if key in seen else seen).add(key)
    return dup


def test_load_data_builtin_sampling():
    full = load_data("digits")
    part = load_data("digits", sample_rate=15, data_seed=0)
    assert len(part.train) < len(full.train) and len(part.test) == len(full.test) and len(part.valid) == len(full.valid)
    assert torch.bincount(part.train.labels).min() >= 1


def test_image_folder_skips_and_counts_unreadable(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    logs = []
    data = load_data(str(tmp_path), image_size=8, workers=0, log=logs.append)
    assert data.skipped == 2 and logs[0].startswith("skipped 2 unreadable") and "broken.png" in logs[0]
    assert data.classes == ["cat", "dog"] and len(data.train) == 6 and len(data.test) == 6 and data.valid is None
    order, seeds = epoch_plan(len(data.train), 4, steps=2, seed=0, epoch=0)
    batches = list(data.train.train_batches(order, seeds, views=2, device=torch.device("cpu")))
    assert batches[0].x.shape == (4, 3, 8, 8) and len(batches[0].views) == 1
    again = list(data.train.train_batches(order, seeds, views=2, device=torch.device("cpu")))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.views[0], b.views[0]) for a, b in zip(batches, again))
    ev = list(data.test.eval_batches(4, torch.device("cpu")))
    assert sum(len(b.y) for b in ev) == 6


def test_image_folder_drops_files_that_break_after_the_check(tmp_path):
    image_folder(tmp_path)
    data = load_data(str(tmp_path), image_size=8, workers=0)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"corrupted later")  # passes no check now
    order = torch.arange(6).view(1, 6)
    b = next(data.train.train_batches(order, torch.zeros(1, 6, dtype=torch.long), 1, torch.device("cpu")))
    assert b.skipped == 1 and len(b.y) == 5


def test_image_folder_augmentation_does_not_depend_on_workers(tmp_path):
    image_folder(tmp_path, per_class=2)
    order, seeds = epoch_plan(4, 2, steps=2, seed=1, epoch=0)
    xs = []
    for workers in (0, 2):
        data = load_data(str(tmp_path), image_size=8, workers=workers)
        xs.append(torch.cat([b.x for b in data.train.train_batches(order, seeds, 1, torch.device("cpu"))]))
    assert torch.equal(xs[0], xs[1])


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "neither a built-in dataset"),
        ("no_val", "has no val/ folder"),
        ("empty", "no class folders"),
        ("mismatch", "different classes: only in train/: \\['bird'\\]"),
        ("no_images", "holds no readable images"),
        ("empty_class", "hold no readable images; every class"),
        ("file", "is a file"),
    ],
)
def test_image_folder_bad_input(tmp_path, case, match):
    root = tmp_path / "data"
    if case == "no_val":
        png(root / "train" / "a" / "0.png", 1)
    elif case == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif case == "mismatch":
        image_folder(root)
        png(root / "train" / "bird" / "0.png", 1)
    elif case == "no_images":
        (root / "train" / "a").mkdir(parents=True)
        png(root / "val" / "a" / "0.png", 1)
    elif case == "empty_class":
        image_folder(root)
        for p in (root / "train" / "dog").iterdir():
            p.unlink()
    elif case == "file":
        root.write_text("x")
    with pytest.raises((FileNotFoundError, ValueError, NotADirectoryError), match=match):
        load_data(str(root), workers=0)


def test_a_one_class_folder_is_refused(tmp_path):
    """Before: a one-class ImageFolder trained and reported 100 % accuracy."""
    image_folder(tmp_path, classes=("cat",))
    with pytest.raises(FineregError, match="has one class folder \\('cat'\\).*at least two class folders"):
        load_data(str(tmp_path), image_size=8, workers=0)


def test_image_folder_valid_folder_is_the_validation_split(tmp_path):
    image_folder(tmp_path)
    for c, name in enumerate(("cat", "dog")):
        png(tmp_path / "valid" / name / "0.png", 7 + c)
    data = load_data(str(tmp_path), image_size=8, workers=0)
    assert len(data.valid) == 2 and list(data.evaluation_sets()) == ["test", "valid"]
    png(tmp_path / "valid" / "bird" / "0.png", 9)
    with pytest.raises(FineregError, match="train/ and valid/ .* have different classes"):
        load_data(str(tmp_path), image_size=8, workers=0)
