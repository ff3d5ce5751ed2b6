"""The CIFAR-10 protocol's data: the packaged files and their checksums, the user's torchvision folder, the fixed
splits, the seeded CIFAR-10-C draw and its cache, and a run on it reporting test, corrupted and retention."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from finereg._checks import FineregError, MissingFileError
from finereg.train.cifar10 import CIFAR10_CLASSES, PACKAGED_DIR, cifar10_splits, load_cifar10, to_float_images
from finereg.train.cifar10_task import (
    CIFAR10_SPLIT,
    SHIFT_CORRUPTIONS,
    cifar10_c_draw,
    cifar10_task,
    corrupted_test_images,
)

# the checksums the data's README states (src/finereg/_data/cifar10/README.md)
SHA256 = {
    "cifar10-test-jpeg.tar.gz": "75d84991587e9621423b81ffd4e5961da6b5840589abaf35e79674737fdb712a",
    "cifar10-train500-jpeg.tar.gz": "ed075256118d309ceda2234cad90d3c4a30edc4f97f71c2f5cebd20df4ced0e3",
}


@pytest.fixture(scope="module")
def cifar():
    return load_cifar10()


def test_the_packaged_files_match_their_checksums_and_readme():
    for name, want in SHA256.items():
        assert hashlib.sha256((PACKAGED_DIR / name).read_bytes()).hexdigest() == want
        assert want in (PACKAGED_DIR / "README.md").read_text()
    sums = dict(reversed(line.split()) for line in (PACKAGED_DIR / "SHA256SUMS").read_text().splitlines())
    assert sums == SHA256
    size = sum(p.stat().st_size for p in PACKAGED_DIR.iterdir())
    assert size < 25 * 2**20  # the budget for data in the repository


def test_the_packaged_subset_has_every_class_in_full(cifar):
    assert cifar.train_images.shape == (5000, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(cifar.train_labels).tolist() == [500] * 10
    assert np.bincount(cifar.test_labels).tolist() == [1000] * 10
    assert 40 < cifar.test_images.mean() < 200  # decoded photographs, not blank


def test_a_damaged_packaged_file_is_named(tmp_path, monkeypatch):
    import finereg.train.cifar10 as c

    for name in SHA256:
        (tmp_path / name).write_bytes((PACKAGED_DIR / name).read_bytes()[:-10])
    (tmp_path / "SHA256SUMS").write_text((PACKAGED_DIR / "SHA256SUMS").read_text())
    monkeypatch.setattr(c, "PACKAGED_DIR", tmp_path)
    c.load_cifar10.cache_clear()
    try:
        with pytest.raises(FineregError, match="does not match its SHA-256.*damaged"):
            c.load_cifar10()
    finally:
        c.load_cifar10.cache_clear()


def test_a_torchvision_folder_is_read_with_its_original_pixels(tmp_path, cifar):
    """torchvision's cifar-10-batches-py format: pickles of (N, 3072) uint8 in CHW order and their labels."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = cifar.train_images.transpose(0, 3, 1, 2).reshape(-1, 3072)
    for i in range(5):
        part = slice(i * 1000, (i + 1) * 1000)
        batch = {"data": rows[part], "labels": cifar.train_labels[part].tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {"data": cifar.test_images.transpose(0, 3, 1, 2).reshape(-1, 3072), "labels": cifar.test_labels.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    mine = load_cifar10(str(tmp_path))
    assert np.array_equal(mine.train_images, cifar.train_images) and np.array_equal(mine.test_labels, cifar.test_labels)
    assert "original pixels" in mine.source
    with pytest.raises(MissingFileError, match="neither torchvision's CIFAR-10 folder.*download=True"):
        load_cifar10(str(tmp_path / "nothing"))


def test_the_splits_are_fixed_disjoint_and_per_class(cifar):
    s = cifar10_splits(cifar, **CIFAR10_SPLIT)
    again = cifar10_splits(cifar, **CIFAR10_SPLIT)
    assert all(torch.equal(a, b) for a, b in ((s.test, again.test), (s.val, again.val), (s.pool, again.pool)))
    assert set(s.val.tolist()).isdisjoint(s.pool.tolist())
    for idx, labels, k in ((s.test, cifar.test_labels, 300), (s.val, cifar.train_labels, 100),
                           (s.pool, cifar.train_labels, 100)):  # fmt: skip
        assert np.bincount(labels[idx.numpy()], minlength=10).tolist() == [k] * 10
    other = cifar10_splits(cifar, **CIFAR10_SPLIT, split_seed=1)
    assert not torch.equal(other.test, s.test)
    with pytest.raises(FineregError, match="asks for 2000 test"):
        cifar10_splits(cifar, test_per_class=2000)


def test_the_corruption_draw_is_seeded_prefix_stable_and_leaves_out_frost():
    names, sev = cifar10_c_draw(3000)
    names2, sev2 = cifar10_c_draw(100)
    assert names[:100] == names2 and np.array_equal(sev[:100], sev2)
    assert set(names) == set(SHIFT_CORRUPTIONS) and "frost" not in names and len(SHIFT_CORRUPTIONS) == 14
    assert set(sev.tolist()) == {1, 2, 3, 4, 5}
    counts = np.unique(np.array(names), return_counts=True)[1]
    assert counts.min() > 3000 / 14 * 0.7  # uniform: every corruption well represented
    assert cifar10_c_draw(50, seed=1) != cifar10_c_draw(50)


def test_the_corrupted_set_is_made_once_and_read_from_the_cache(tmp_path, cifar, monkeypatch):
    images = cifar.test_images[:40]
    first = corrupted_test_images(images, tmp_path)
    assert first.shape == images.shape and first.dtype == np.uint8 and not np.array_equal(first, images)
    import finereg.corruptions as fc

    def no(*a, **k):
        raise AssertionError("the cache was not read")

    monkeypatch.setattr(fc, "corrupt_many", no)
    assert np.array_equal(corrupted_test_images(images, tmp_path), first)


def test_resizing_is_bilinear_with_repeated_edges():
    img = np.full((1, 32, 32, 3), 200, dtype=np.uint8)
    x = to_float_images(img, 64)
    assert x.shape == (1, 3, 64, 64) and torch.allclose(x, torch.full_like(x, 200 / 255))  # no dark border


def test_the_task_splits_rates_and_classes(tmp_path):
    d = cifar10_task(sample_rate=10, image_size=32, cache=tmp_path)
    assert d.classes == list(CIFAR10_CLASSES) and len(d.train) == 100 and len(d.pool) == 1000
    assert len(d.test) == len(d.shift) == 3000 and len(d.valid) == 1000
    assert torch.equal(d.test.labels, d.shift.labels)
    d25 = cifar10_task(sample_rate=25, image_size=32, cache=tmp_path)
    assert set(d.train_index.tolist()) <= set(d25.train_index.tolist())  # nested rates


def test_retention_is_100_for_the_pretrained_network_and_measured_by_every_run(tmp_path):
    """The pretrained network agrees with itself on every test image (retention 100 %, from the same forward as
    the accuracy); a fine-tuning run reports test, corrupted-test and retention accuracy."""
    from finereg.train.build import build_task
    from finereg.train.config import resolve
    from finereg.train.loop import FitConfig, evaluate, fit
    from finereg.train.retention import source_reference

    cfg = FitConfig(data="cifar10", sample_rate=10, epochs=1, iters_per_epoch=2, out=str(tmp_path / "run"),
                    progress=False, tensorboard=False, threads=1)  # fmt: skip
    data, bundle = build_task(resolve(cfg, 0.0), lambda m: None)
    net = bundle.net
    keep = source_reference(net, data.test, ("test", 1), torch.device("cpu"))
    row = evaluate(net, data.test, 256, torch.device("cpu"), 10, retention=keep)
    assert (
        row["test_retention"] == 100.0
        and row["test_top1"] == evaluate(net, data.test, 256, torch.device("cpu"), 10)["test_top1"]
    )
    wrong = keep._replace(reference=(keep.reference + 1) % 1000)
    assert evaluate(net, data.test, 256, torch.device("cpu"), 10, retention=wrong)["test_retention"] == 0.0
    final = fit(cfg, log=lambda m: None).history[-1]
    assert 0 <= final["test_retention"] <= 100 and 0 <= final["shift_top1"] <= 100
    assert "valid_retention" not in final and "shift_retention" not in final
