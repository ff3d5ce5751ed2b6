"""Motion blur as ImageMagick computes it (checked against ImageMagick itself where Wand is installed) and glass
blur's vectorized pixel moves against the official sequential loop."""

from __future__ import annotations

import ctypes
import io

import numpy as np
import pytest

from finereg.corruptions.blur import GLASS_BLUR, glass_blur, imagemagick_motion_blur, motion_kernel

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")


def test_motion_kernel_is_a_one_sided_gaussian_line():
    weights, rows, cols = motion_kernel(6, 2.0, 0.0)
    assert len(weights) == 13  # 2·ceil(radius) + 1 taps
    assert weights.sum() == pytest.approx(1.0)
    assert (np.diff(weights) < 0).all()  # the heaviest tap on the pixel itself, decreasing along the line
    np.testing.assert_array_equal(rows, 0)
    np.testing.assert_array_equal(cols, np.arange(13))
    _, rows, cols = motion_kernel(9, 2.5, 90.0)
    np.testing.assert_array_equal(rows, np.arange(19))
    np.testing.assert_array_equal(cols, 0)
    _, rows, cols = motion_kernel(6, 1.0, -45.0)
    np.testing.assert_array_equal(cols, -rows)  # the diagonal, rounded half up alike on both axes


def test_motion_blur_of_a_constant_image_is_constant():
    image = np.full((32, 32, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(imagemagick_motion_blur(image, 8, 2.0, 30.0), image)


def test_motion_blur_smears_a_dot_along_the_angle():
    image = np.zeros((32, 32), dtype=np.uint8)
    image[16, 16] = 255
    out = imagemagick_motion_blur(image, 6, 2.0, 0.0)
    # each pixel averages the pixels to its right: the dot shows up on its left, in its row only
    assert out[16, 11:17].min() > 0 and out[16, 17:].max() == 0 and out[15].max() == 0
    assert (np.diff(out[16, 11:17].astype(int)) > 0).all()  # heaviest on the dot itself


def _imagemagick():
    wand_image = pytest.importorskip(
        "wand.image", reason="Wand with ImageMagick's MagickWand library", exc_type=ImportError
    )
    from wand.api import library

    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    return wand_image.Image, library


def _official_round_trip(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """The official path: a PNG through ImageMagick's motion blur, decoded by OpenCV."""
    from PIL import Image

    wand_cls, library = _imagemagick()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with wand_cls(blob=buffer.getvalue()) as w:
        library.MagickMotionBlurImage(w.wand, radius, sigma, angle)
        blob = w.make_blob()
    out = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.ndim == 2 or out.ndim == 3:
        return out[..., [2, 1, 0]] if out.ndim == 3 else out
    return np.stack([out] * 3, axis=-1)  # ImageMagick wrote a grey PNG for a grey-looking image


def test_equals_imagemagick():
    _imagemagick()
    rng = np.random.default_rng(0)
    params = [(6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5)]
    for t in range(12):
        image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (5, 5), 1.0)  # photo-like smoothness
        radius, sigma = params[t % 5]
        angle = rng.uniform(-45, 45)
        np.testing.assert_array_equal(
            imagemagick_motion_blur(image, radius, sigma, angle), _official_round_trip(image, radius, sigma, angle)
        )
    for t in range(8):  # snow's grey layers: sparse flakes, radius up to 14, angles in [-135, -45)
        flakes = (rng.random((32, 32)) > 0.8) * rng.integers(0, 256, size=(32, 32))
        flakes = flakes.astype(np.uint8)
        radius, sigma = [(8, 3), (10, 4), (12, 6), (14, 12)][t % 4]
        angle = rng.uniform(-135, -45)
        np.testing.assert_array_equal(
            imagemagick_motion_blur(flakes, radius, sigma, angle), _official_round_trip(flakes, radius, sigma, angle)
        )


def _official_loop(x: np.ndarray, moves: np.ndarray, delta: int) -> np.ndarray:
    """The official loop's statement on numpy arrays, one position at a time (moves[k] = (dx, dy))."""
    x = x.copy()
    k = 0
    for h in range(32 - delta, delta, -1):
        for w in range(32 - delta, delta, -1):
            dx, dy = moves[k]
            k += 1
            x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]  # views on the right: a copy, not a swap
    return x


def test_glass_blur_moves_equal_the_official_loop():
    from skimage.filters import gaussian

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for severity in range(1, 6):
        sigma, delta, rounds = GLASS_BLUR[severity - 1]
        draws = np.random.default_rng(severity)
        x = (gaussian(image / 255.0, sigma=sigma, channel_axis=-1) * 255).astype(np.uint8)
        for _ in range(rounds):
            moves = draws.integers(-delta, delta, size=(30, 30, 2)).reshape(-1, 2)
            x = _official_loop(x, moves, delta)
        expected = np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255
        np.testing.assert_array_equal(glass_blur(image, severity, np.random.default_rng(severity)), expected)


def test_the_official_statement_copies():
    x = np.arange(12).reshape(2, 2, 3)
    x[0, 0], x[1, 1] = x[1, 1], x[0, 0]
    np.testing.assert_array_equal(x[0, 0], x[1, 1])  # both hold the old x[1, 1]: the pixel was copied
