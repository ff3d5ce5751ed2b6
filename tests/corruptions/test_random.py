"""The random corruptions follow the official recipes: their statistics per severity, the direction of the
severities, uint8 outputs, and seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finereg.corruptions import CORRUPTIONS, corrupt, corrupt_many
from finereg.corruptions.digital import CONTRAST
from finereg.corruptions.noise import GAUSSIAN_NOISE, IMPULSE_NOISE, SHOT_NOISE, SPECKLE_NOISE
from finereg.corruptions.weather import plasma_fractal

from ..conftest import DATA

pytest.importorskip("cv2")
pytest.importorskip("skimage")

RANDOM = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "fog",
    "spatter",
    "elastic_transform",
)
# severities monotone in distortion by their recipe (a stronger parameter at each step)
MONOTONE = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "zoom_blur",
    "contrast",
    "brightness",
    "fog",
)


@pytest.fixture(scope="module")
def photos():
    """The 6 real CIFAR-10 test images of the reference file."""
    cases = torch.load(DATA / "cifar_c_reference.pt", weights_only=True)
    seen = {}
    for c in cases:
        seen.setdefault(c["source"], c["image"].numpy())
    return np.stack(list(seen.values()))


def grey(value: int, n: int = 8) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, dtype=np.uint8)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_gaussian_noise_std(severity):
    out = corrupt_many(grey(128), "gaussian_noise", severity, seed=severity) / 255.0
    c = GAUSSIAN_NOISE[severity - 1]
    # storage truncates: the mean drops by half a level, the std gains the quantization's 1/sqrt(12) level
    assert out.std() == pytest.approx(np.sqrt(c**2 + 1 / 12 / 255**2), rel=0.03)
    assert out.mean() == pytest.approx(128 / 255 - 0.5 / 255, abs=4 * c / np.sqrt(out.size))


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_shot_noise_is_poisson(severity):
    c = SHOT_NOISE[severity - 1]
    out = corrupt_many(grey(102), "shot_noise", severity, seed=severity) / 255.0
    x = 102 / 255
    assert out.std() == pytest.approx(np.sqrt(x / c + 1 / 12 / 255**2), rel=0.04)  # Poisson(c·x)/c: var x/c
    assert out.mean() == pytest.approx(x - 0.5 / 255, abs=4 * np.sqrt(x / c / out.size) + 1e-3)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_speckle_noise_std_scales_with_the_value(severity):
    c = SPECKLE_NOISE[severity - 1]
    for value in (60, 160):
        out = corrupt_many(grey(value), "speckle_noise", severity, seed=severity) / 255.0
        assert out.std() == pytest.approx(np.sqrt((value / 255 * c) ** 2 + 1 / 12 / 255**2), rel=0.04)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_impulse_noise_fraction_and_values(severity):
    amount = IMPULSE_NOISE[severity - 1]
    out = corrupt_many(grey(128, 16), "impulse_noise", severity, seed=severity)
    changed = out != 128
    assert changed.mean() == pytest.approx(amount, rel=0.1)
    assert set(np.unique(out[changed])) <= {0, 255}
    assert (out == 255).sum() == pytest.approx((out == 0).sum(), rel=0.25)  # salt and pepper alike
    # a value already at 0 changes only when salted: about half the amount
    black = corrupt_many(grey(0, 16), "impulse_noise", severity, seed=severity)
    assert (black != 0).mean() == pytest.approx(amount / 2, rel=0.15)


@pytest.mark.parametrize("name", MONOTONE)
def test_severities_increase_the_distortion(photos, name):
    err = []
    for severity in range(1, 6):
        out = corrupt_many(photos, name, severity, seed=7).astype(np.float64)
        err.append(np.abs(out - photos).mean())
    assert all(b > a for a, b in zip(err, err[1:])), (name, err)


def test_contrast_keeps_the_channel_means(photos):
    for severity in range(1, 6):
        out = corrupt_many(photos, "contrast", severity, seed=0).astype(np.float64)
        assert np.abs(out.mean(axis=(1, 2)) - photos.mean(axis=(1, 2))).max() < 1.0  # truncation: under a level
        spread = out.std(axis=(1, 2)) / photos.std(axis=(1, 2))
        np.testing.assert_allclose(spread, CONTRAST[severity - 1], rtol=0.06, atol=0.01)


@pytest.mark.parametrize("name", RANDOM)
def test_seeded_outputs_are_reproducible(photos, name):
    image = photos[1]
    a = corrupt(image, name, 3, seed=11)
    b = corrupt(image, name, 3, seed=11)
    c = corrupt(image, name, 3, seed=12)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    gen = corrupt(image, name, 3, seed=np.random.default_rng(11))  # a Generator is used as is
    np.testing.assert_array_equal(gen, a)


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "frost"])
def test_every_severity_gives_uint8_images(photos, name):
    for severity in range(1, 6):
        out = corrupt(photos[0], name, severity, seed=severity)
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
        assert out.base is None or not np.shares_memory(out, photos)  # a new array


def test_plasma_fractal_spans_zero_to_one():
    a = plasma_fractal(2.0, np.random.default_rng(0))
    assert a.shape == (32, 32) and a.min() == 0 and a.max() == 1
    np.testing.assert_array_equal(a, plasma_fractal(2.0, np.random.default_rng(0)))
    # a larger decay damps the fine scales: neighbouring values closer
    rough = [
        np.abs(np.diff(plasma_fractal(d, np.random.default_rng(s)), axis=1)).mean() for d in (1.5, 3) for s in (0, 1)
    ]
    assert min(rough[:2]) > max(rough[2:])


def test_fog_brightens_towards_a_haze(photos):
    out = corrupt_many(photos, "fog", 5, seed=0).astype(np.float64)
    # (x + a·P)·m/(m + a): the contrast of the image shrinks by m/(m + a), a = 1.5
    assert out.std(axis=(1, 2)).mean() < photos.std(axis=(1, 2)).mean()


def test_snow_adds_bright_flakes(photos):
    out = corrupt_many(photos, "snow", 5, seed=0).astype(np.float64)
    assert out.mean() > photos.mean() + 20


def test_spatter_water_and_mud(photos):
    water = corrupt_many(photos, "spatter", 3, seed=0).astype(np.int16)
    assert (water >= photos).all()  # water only adds a turquoise tint
    mud = corrupt_many(photos, "spatter", 5, seed=0).astype(np.int16)
    changed = (mud != photos).any(axis=-1)
    assert changed.any()
    # mud pixels move towards brown (63, 42, 20): red above blue where they changed a lot
    assert (mud[changed][:, 0] >= mud[changed][:, 2]).mean() > 0.5


def test_elastic_severity_one_is_an_affine_warp_only(photos):
    from finereg.corruptions.digital import ELASTIC

    assert ELASTIC[0][:2] == (0, 0)  # no displacement field at severity 1: the affine jitter alone
    out = corrupt(photos[0], "elastic_transform", 1, seed=0)
    assert not np.array_equal(out, photos[0])
