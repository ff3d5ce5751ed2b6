"""The weather family of CIFAR-10-C: snow, frost and fog, and the extra spatter (brightness, which the paper counts
as weather, lives with the other HSV edit in :mod:`.digital`).

Each function takes the uint8 32 x 32 x 3 image, the severity (1-5) and a ``numpy.random.Generator`` and returns
the official output before storage (floats in [0, 255]). ``x`` is the image in [0, 1].

**fog** ``(a, decay)`` = (0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75): ``m = max(x)``;
``clip((x + a·P) · m / (m + a), 0, 1)`` with ``P`` a 32 x 32 plasma fractal (:func:`plasma_fractal`, roughness
``decay``), the same on every channel.

**snow** ``(μ, σ, zoom, t, R, s, b)`` = (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
(0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8): a
32 x 32 layer of N(μ, σ²) values, zoomed into its centre by ``zoom``, values below ``t`` set to 0, stored as 8-bit
grey, motion-blurred as ImageMagick does (radius ``R``, std ``s``, angle uniform in [-135°, -45°)), back in
[0, 1] as ``S``; the image is greyed towards white, ``x' = b·x + (1 - b)·max(x, 1.5·grey(x) + 0.5)`` (OpenCV's
RGB to grey in float32), and the output is ``clip(x' + S + rot180(S), 0, 1)``.

**spatter** ``(μ, σ, s, t, i, mud)`` = (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
(0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1): a layer ``L`` of
N(μ, σ²) values blurred by a Gaussian of std ``s``, values below ``t`` set to 0. Water (``mud = 0``): the edges of
``L`` (as bytes, OpenCV Canny 50/150) give a distance map (L2 distance transform, capped at 20, 3 x 3 box blur,
bytes, histogram-equalized, an emboss filter ``[[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]`` into bytes, 3 x 3 box blur);
``m = L_bytes · dist``, scaled to maximum ``i``; output ``clip(x + m · (175, 238, 238) / 255, 0, 1)`` (pale
turquoise). Mud (``mud = 1``): ``m`` = Gaussian (std ``i``) of the mask ``L > t``, values below 0.8 set to 0;
output ``clip(x·(1 - m) + m · (63, 42, 20) / 255, 0, 1)`` (brown). One guard the official code lacks: when no
value of ``L`` reaches ``t`` (the water layer is empty) the official ``m / max(m)`` is 0 / 0 and stores undefined
bytes; here the image is returned unchanged.

**frost** ``(a, b)`` = (1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45): ``clip(a·image + b·F, 0, 255)``
on the 0-255 scale, ``F`` a random 32 x 32 crop of one of the official frost photographs (``frost1.png``,
``frost2.png``, ``frost3.png``, ``frost4.jpg``, ``frost5.jpg``; the official ``randint(5)`` never picks
``frost6.jpg``), read by OpenCV and shrunk by 0.2 (bilinear). The photographs are not part of finereg: point the
environment variable ``FINEREG_FROST_DIR`` at a folder holding them (the files the official script reads from
its working directory); without it frost raises a :class:`~finereg._checks.FineregError` saying so.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .._checks import FineregError
from ._common import SIZE, clipped_zoom, gaussian, import_cv2, to_unit
from .blur import imagemagick_motion_blur

__all__ = [
    "FOG",
    "SNOW",
    "SPATTER",
    "FROST",
    "FROST_FILES",
    "FROST_ENV",
    "plasma_fractal",
    "fog",
    "snow",
    "spatter",
    "frost",
    "frost_images",
]

FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1.0, 2), (1.5, 1.75))  # (fog strength, fractal decay)
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)  # (mean, std, zoom, threshold, blur radius, blur std, image weight)
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)  # (mean, std, blur std, threshold, intensity / mud blur std, mud?)
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (image weight, frost weight)
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_ENV = "FINEREG_FROST_DIR"


def plasma_fractal(decay: float, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A ``size x size`` plasma fractal in [0, 1] by the diamond-square algorithm (the official variant, on a
    torus): with step ``n = size, size/2, ..., 2`` and amplitude ``w = 100, 100/decay, ...``, every square's centre
    becomes the mean of its 4 corners plus ``w·U(-w, w)``, then every edge midpoint the mean of its 4 diamond
    neighbours (wrapping around) plus ``w·U(-w, w)``; finally shifted and scaled to [0, 1]."""
    if size & (size - 1):
        raise FineregError(f"size must be a power of two, got {size}")
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        grid[half:size:step, half:size:step] = noisy_mean(total)  # squares
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        total = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = noisy_mean(total)  # diamonds on the rows of the corners
        total = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = noisy_mean(total)  # diamonds on the columns of the corners
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A plasma-fractal haze added and the range renormalized (module docstring); ``FOG[severity - 1]``."""
    strength, decay = FOG[severity - 1]
    x = to_unit(image)
    top = x.max()
    x = x + strength * plasma_fractal(decay, rng)[:SIZE, :SIZE, np.newaxis]
    return np.clip(x * top / (top + strength), 0, 1) * 255


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion-blurred snow flakes over a whitened image (module docstring); ``SNOW[severity - 1]``."""
    cv2 = import_cv2("snow")
    mean, std, zoom, threshold, radius, sigma, weight = SNOW[severity - 1]
    x = to_unit(image, np.float32)
    layer = rng.normal(loc=mean, scale=std, size=x.shape[:2])
    layer = clipped_zoom(layer[..., np.newaxis], zoom, "snow")
    layer[layer < threshold] = 0
    grey = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)
    flakes = imagemagick_motion_blur(grey, radius, sigma, rng.uniform(-135, -45)) / 255.0
    flakes = flakes[..., np.newaxis]
    whiter = np.maximum(x, cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(SIZE, SIZE, 1) * 1.5 + 0.5)
    x = weight * x + (1 - weight) * whiter
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255


def _water(x: np.ndarray, layer: np.ndarray, intensity: float) -> np.ndarray:
    cv2 = import_cv2("spatter")
    liquid = (layer * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
    m = liquid * dist
    top = m.max()
    if top == 0:  # no water (see the module docstring)
        return x * 255
    m = m / top * intensity
    color = np.array([175, 238, 238], dtype=np.float32) / np.float32(255.0)
    return np.clip(x + m[..., np.newaxis] * color, 0, 1) * 255


def spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops or mud splashes (module docstring); ``SPATTER[severity - 1]``."""
    mean, std, sigma, threshold, intensity, mud = SPATTER[severity - 1]
    x = to_unit(image, np.float32)
    layer = gaussian(rng.normal(loc=mean, scale=std, size=x.shape[:2]), sigma, "spatter")
    layer[layer < threshold] = 0
    if not mud:
        return _water(x, layer, intensity)
    m = gaussian(np.where(layer > threshold, 1, 0).astype(np.float32), intensity, "spatter")
    m[m < 0.8] = 0
    color = np.array([63, 42, 20], dtype=np.float32) / np.float32(255.0)
    return np.clip(x * (1 - m[..., np.newaxis]) + color * m[..., np.newaxis], 0, 1) * 255


@functools.lru_cache(maxsize=4)
def _load_frost(folder: str) -> tuple[np.ndarray, ...]:
    cv2 = import_cv2("frost")
    out = []
    for name in FROST_FILES[:5]:
        photo = cv2.imread(str(Path(folder) / name))
        if photo is None:
            raise FineregError(f"frost: OpenCV cannot read {Path(folder) / name}")
        out.append(cv2.resize(photo, (0, 0), fx=0.2, fy=0.2))
    return tuple(out)


def frost_images() -> tuple[np.ndarray, ...]:
    """The 5 frost photographs the official code draws from (BGR, shrunk by 0.2), read from the folder named by
    ``$FINEREG_FROST_DIR``; a :class:`FineregError` says what to supply when it is unset or incomplete."""
    folder = os.environ.get(FROST_ENV)
    files = ", ".join(FROST_FILES[:5])
    if not folder:
        raise FineregError(
            "frost needs the official CIFAR-10-C frost photographs, which finereg does not ship: set the "
            f"environment variable {FROST_ENV} to a folder holding {files} (the files the official "
            "make_cifar_c.py reads), or leave 'frost' out (finereg.corruptions.available_corruptions())"
        )
    missing = [n for n in FROST_FILES[:5] if not (Path(folder) / n).is_file()]
    if missing:
        raise FineregError(f"{FROST_ENV}={folder} lacks the frost photographs {', '.join(missing)} (needs {files})")
    photos = _load_frost(str(Path(folder).resolve()))
    small = [p.shape[:2] for p in photos if p.shape[0] <= SIZE or p.shape[1] <= SIZE]
    if small:
        raise FineregError(f"frost photographs shrunk by 0.2 must exceed {SIZE} px on each side, got {small}")
    return photos


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The image blended with a random crop of a frost photograph (module docstring); ``FROST[severity - 1]``."""
    a, b = FROST[severity - 1]
    photos = frost_images()
    photo = photos[rng.integers(5)]
    top = rng.integers(0, photo.shape[0] - SIZE)
    left = rng.integers(0, photo.shape[1] - SIZE)
    crop = photo[top : top + SIZE, left : left + SIZE][..., [2, 1, 0]]
    return np.clip(a * np.asarray(image) + b * crop, 0, 255)
