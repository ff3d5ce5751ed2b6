"""The blur family of CIFAR-10-C: defocus, glass, motion and zoom blur, and the extra Gaussian blur.

Each function takes the uint8 32 x 32 x 3 image, the severity (1-5) and a ``numpy.random.Generator`` (unused by the
deterministic ones) and returns the official output before storage (floats in [0, 255], or uint8).

Recipes and parameters for severities 1-5:

* ``gaussian_blur``: scikit-image's Gaussian filter of std ``s`` (edges repeated, truncated at 4 std);
  ``s`` = 0.4, 0.6, 0.7, 0.8, 1.
* ``defocus_blur``: convolution (OpenCV ``filter2D``, borders reflected without repeating the edge) with an
  anti-aliased disk of radius ``r`` (a 17 x 17 binary disk, normalized, blurred by a 3 x 3 Gaussian of std
  ``a``); ``(r, a)`` = (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1).
* ``glass_blur``: Gaussian blur ``s``, bytes, ``n`` rounds of local pixel moves by up to ``d``, Gaussian blur
  ``s`` again; ``(s, d, n)`` = (0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2).
* ``motion_blur``: ImageMagick's motion blur of radius ``R`` and std ``s`` at an angle uniform in [-45°, 45°);
  ``(R, s)`` = (6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5).
* ``zoom_blur``: the mean of the image and its centre zooms (bilinear, float32) by each factor of
  ``np.arange(1, z, 0.01)``; ``z`` = 1.06, 1.11, 1.16, 1.21, 1.26.

**Glass blur.** The official loop visits the positions ``(h, w)`` for ``h, w = 31, 30, ..., 2`` (rows and columns
in descending order), draws ``(dx, dy)`` uniformly from ``{-1, 0}`` (``randint(-1, 1)``: the upper bound is
exclusive) and writes ``x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]``. On numpy arrays the right-hand
side holds *views*, so this is not a swap: the pixel at ``(h, w)`` takes the value of its neighbour and the
neighbour keeps its own; this is what CIFAR-10-C stores and what is reproduced here. Because every source
``(h + dy, w + dx)`` is visited after ``(h, w)`` in that order, each round reads only values the round has not yet
written, and the loop equals one vectorized gather ``x_new[h, w] = x_old[h + dy, w + dx]`` per round.

**Motion blur** (:func:`imagemagick_motion_blur`) is ImageMagick's ``MotionBlurImage``, written out in numpy
instead of calling ImageMagick through Wand: a one-sided line kernel of ``2·ceil(R) + 1`` taps with weights
``exp(-i² / 2s²)`` (i = 0, 1, ...), normalized; tap ``i`` reads the pixel ``round(i·cos θ)`` columns and
``round(i·sin θ)`` rows away (rounded half up), edge pixels repeated beyond the border; the sum is taken on 16-bit
quanta (``v·257``), rounded, and written back to 8 bits by integer division by 257, as a Q16 ImageMagick does when
it reads and writes the official PNG round trip. It equals ImageMagick 6.9.11 Q16 value for value (checked by the
tests where Wand and ImageMagick are installed).
"""

from __future__ import annotations

import numpy as np

from ._common import SIZE, clipped_zoom, gaussian, import_cv2, to_unit

__all__ = [
    "GAUSSIAN_BLUR",
    "DEFOCUS_BLUR",
    "GLASS_BLUR",
    "MOTION_BLUR",
    "ZOOM_BLUR",
    "gaussian_blur",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "disk_kernel",
    "motion_kernel",
    "imagemagick_motion_blur",
]

GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # std in pixels
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (disk radius, anti-alias std)
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # (std, max move, rounds)
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # (radius, std); angle ~ U[-45, 45)
ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors np.arange(1, z, 0.01)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian filter of std ``GAUSSIAN_BLUR[severity - 1]`` on the image in [0, 1] (each channel, edges
    repeated, truncated at 4 std), clipped, times 255."""
    x = gaussian(to_unit(image), GAUSSIAN_BLUR[severity - 1], "gaussian_blur")
    return np.clip(x, 0, 1) * 255


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The official anti-aliased disk, float32: on the grid ``[-8, 8]²`` (``[-r, r]²`` for r > 8) the points with
    ``x² + y² <= r²`` set to 1, normalized to sum 1, then blurred by OpenCV's Gaussian of std ``alias_blur`` with a
    3 x 3 window (5 x 5 for r > 8)."""
    cv2 = import_cv2("defocus_blur")
    half, ksize = (8, (3, 3)) if radius <= 8 else (int(radius), (5, 5))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Each channel of the image in [0, 1] convolved (OpenCV ``filter2D``, borders reflected without repeating
    the edge) with :func:`disk_kernel` of ``DEFOCUS_BLUR[severity - 1]``, clipped, times 255."""
    cv2 = import_cv2("defocus_blur")
    kernel = disk_kernel(*DEFOCUS_BLUR[severity - 1])
    return np.clip(cv2.filter2D(to_unit(image), -1, kernel), 0, 1) * 255


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of std ``s``, truncated to bytes; ``n`` rounds in which each pixel ``(h, w)``, ``h, w`` in
    ``[d + 1, 31]``, takes the value of the pixel ``(h + dy, w + dx)``, ``dx, dy`` uniform integers in
    ``[-d, d)`` (the official loop's behaviour, see the module docstring); Gaussian blur ``s`` again, clipped,
    times 255. ``(s, d, n) = GLASS_BLUR[severity - 1]``."""
    sigma, delta, rounds = GLASS_BLUR[severity - 1]
    if delta != 1:  # pragma: no cover - every official severity moves by 1 (the gather below relies on it)
        raise NotImplementedError("glass_blur's vectorized moves assume a maximum move of 1 pixel")
    x = (gaussian(to_unit(image), sigma, "glass_blur") * 255).astype(np.uint8)
    pos = np.arange(SIZE - delta, delta, -1)  # 31, 30, ..., 2: the official visiting order
    hh, ww = np.meshgrid(pos, pos, indexing="ij")
    for _ in range(rounds):
        moves = rng.integers(-delta, delta, size=(pos.size, pos.size, 2))  # (dx, dy) per position
        x[hh, ww] = x[hh + moves[..., 1], ww + moves[..., 0]]
    return np.clip(gaussian(x / 255.0, sigma, "glass_blur"), 0, 1) * 255


def motion_kernel(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's motion-blur kernel: ``(weights, row offsets, column offsets)`` of its ``2·ceil(radius) + 1``
    taps (weights ``exp(-i² / 2σ²)`` normalized to sum 1; tap ``i`` at ``ceil(i·sin θ - 0.5)`` rows and
    ``ceil(i·cos θ - 0.5)`` columns, ``θ = angle`` in degrees)."""
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i * i) / (2.0 * sigma * sigma)) / (np.sqrt(2 * np.pi) * sigma)
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    px, py = width * np.sin(theta), width * np.cos(theta)
    norm = np.hypot(px, py)
    cols = np.ceil(i * py / norm - 0.5).astype(np.int64)
    rows = np.ceil(i * px / norm - 0.5).astype(np.int64)
    return weights, rows, cols


def imagemagick_motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` on a uint8 image (H x W or H x W x C), computed as
    a Q16 ImageMagick does it (module docstring): uint8 out."""
    weights, rows, cols = motion_kernel(radius, sigma, angle)
    h, w = image.shape[:2]
    quanta = np.asarray(image, dtype=np.float64) * 257.0
    acc = np.zeros_like(quanta)
    for k, dr, dc in zip(weights, rows, cols):
        r = np.clip(np.arange(h) + dr, 0, h - 1)
        c = np.clip(np.arange(w) + dc, 0, w - 1)
        acc += k * quanta[r[:, None], c[None, :]]
    q16 = np.clip(np.floor(acc + 0.5), 0, 65535).astype(np.int64)
    return (q16 // 257).astype(np.uint8)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`imagemagick_motion_blur` with ``(R, s) = MOTION_BLUR[severity - 1]`` at an angle drawn uniformly
    from [-45°, 45°): uint8 out."""
    radius, sigma = MOTION_BLUR[severity - 1]
    return imagemagick_motion_blur(image, radius, sigma, rng.uniform(-45, 45))


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image in [0, 1] (float32) averaged with its :func:`~finereg.corruptions._common.clipped_zoom` by every
    factor of ``np.arange(1, ZOOM_BLUR[severity - 1], 0.01)`` (the factor 1 included: the image counts twice),
    clipped, times 255."""
    factors = np.arange(1, ZOOM_BLUR[severity - 1], 0.01)
    x = to_unit(image).astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += clipped_zoom(x, factor, "zoom_blur")
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255
