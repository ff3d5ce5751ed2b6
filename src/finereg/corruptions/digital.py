"""The digital family of CIFAR-10-C: contrast, elastic transform, pixelate and JPEG compression; the extra
saturate and brightness (a weather corruption in the paper), the two HSV edits.

Each function takes the uint8 32 x 32 x 3 image, the severity (1-5) and a ``numpy.random.Generator`` (used by
elastic_transform only) and returns the official output before storage (floats in [0, 255], or uint8). ``x`` is
the image in [0, 1], float64.

================= ============================================================ =================================
corruption        recipe                                                       parameters for severities 1-5
================= ============================================================ =================================
contrast          ``clip((x - μ)·c + μ, 0, 1)``, μ the mean of each channel     c = 0.75, 0.5, 0.4, 0.3, 0.15
brightness        HSV (scikit-image): ``V = clip(V + c, 0, 1)``                 c = 0.05, 0.1, 0.15, 0.2, 0.3
saturate          HSV: ``S = clip(S·k + c, 0, 1)``                              (k, c) = (0.3, 0), (0.1, 0), (1.5, 0),
                                                                               (2, 0.1), (2.5, 0.2)
jpeg_compression  Pillow's JPEG encoder at quality ``q``, decoded               q = 80, 65, 58, 50, 40
pixelate          Pillow box resize to ``int(32·f)`` px and back to 32           f = 0.95, 0.9, 0.85, 0.75, 0.65
elastic_transform random affine warp then a smooth random displacement field    see :data:`ELASTIC`
================= ============================================================ =================================

**elastic_transform** ``(α, σ, a)`` in pixels = (0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92),
(3.2, 1.28, 1.6), (3.2, 0.96, 0.96) (the official fractions of 32 px): the three points ``(c + 10, c + 10)``,
``(c + 10, c - 10)``, ``(c - 10, c - 10)`` (``c = 16``) each moved by ``U(-a, a)`` per coordinate define an affine
map, applied by OpenCV ``warpAffine`` (bilinear, borders reflected without repeating the edge) to the float32
image; then every pixel is resampled (scipy ``map_coordinates``, bilinear, reflecting borders) at its position
plus ``α·G_σ(U(-1, 1))`` per axis, ``G_σ`` scikit-image's Gaussian filter of std σ (reflecting, truncated at 3σ)
of a field of uniform noise.
"""

from __future__ import annotations

import io

import numpy as np

from ._common import SIZE, gaussian, import_cv2, import_ndimage, import_pil, import_skimage, to_unit

__all__ = [
    "CONTRAST",
    "BRIGHTNESS",
    "SATURATE",
    "JPEG_QUALITY",
    "PIXELATE",
    "ELASTIC",
    "contrast",
    "brightness",
    "saturate",
    "jpeg_compression",
    "pixelate",
    "elastic_transform",
]

CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from the channel mean
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value
SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # (factor, offset) on the HSV saturation
JPEG_QUALITY = (80, 65, 58, 50, 40)  # Pillow's JPEG quality
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # fraction of the side kept by the box downsampling
ELASTIC = tuple(
    (SIZE * alpha, SIZE * sigma, SIZE * affine)
    for alpha, sigma, affine in (
        (0, 0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    )
)  # (displacement scale, displacement smoothness, affine jitter), in pixels


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Deviations from each channel's mean scaled by ``CONTRAST[severity - 1]``, clipped, times 255."""
    c = CONTRAST[severity - 1]
    x = to_unit(image)
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _hsv_edit(image: np.ndarray, channel: int, scale: float, shift: float, what: str) -> np.ndarray:
    sk = import_skimage(what)
    hsv = sk.color.rgb2hsv(to_unit(image))
    hsv[:, :, channel] = np.clip(hsv[:, :, channel] * scale + shift, 0, 1)  # scale 1 is exact in floats
    return np.clip(sk.color.hsv2rgb(hsv), 0, 1) * 255


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``BRIGHTNESS[severity - 1]`` added to the HSV value (clipped to 1), back to RGB, clipped, times 255."""
    return _hsv_edit(image, 2, 1, BRIGHTNESS[severity - 1], "brightness")


def saturate(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The HSV saturation ``S·k + c`` (clipped to [0, 1]), ``(k, c) = SATURATE[severity - 1]``, back to RGB,
    clipped, times 255."""
    k, c = SATURATE[severity - 1]
    return _hsv_edit(image, 1, k, c, "saturate")


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image encoded by Pillow as JPEG at quality ``JPEG_QUALITY[severity - 1]`` and decoded: uint8 out."""
    pil = import_pil("jpeg_compression")
    buffer = io.BytesIO()
    pil.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    with pil.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pillow box resize to ``int(32·f)`` pixels a side, ``f = PIXELATE[severity - 1]``, and box resize back to 32:
    uint8 out."""
    pil = import_pil("pixelate")
    side = int(SIZE * PIXELATE[severity - 1])
    small = pil.fromarray(np.ascontiguousarray(image), mode="RGB").resize((side, side), pil.BOX)
    return np.asarray(small.resize((SIZE, SIZE), pil.BOX)).copy()


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp and a smooth random displacement (module docstring); ``ELASTIC[severity - 1]``."""
    cv2 = import_cv2("elastic_transform")
    ndimage = import_ndimage("elastic_transform")
    alpha, sigma, jitter = ELASTIC[severity - 1]
    x = to_unit(image, np.float32)
    shape = x.shape
    centre = np.float32(shape[:2]) // 2
    third = min(shape[:2]) // 3
    src = np.float32([centre + third, [centre[0] + third, centre[1] - third], centre - third])
    dst = src + rng.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), shape[1::-1], borderMode=cv2.BORDER_REFLECT_101)

    def field() -> np.ndarray:
        noise = rng.uniform(-1, 1, size=shape[:2])
        return (gaussian(noise, sigma, "elastic_transform", mode="reflect", truncate=3) * alpha).astype(np.float32)

    dx, dy = field(), field()
    rows, cols, chans = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    coords = np.stack([rows + dy[..., None], cols + dx[..., None], chans]).reshape(3, -1)
    out = ndimage.map_coordinates(x, coords, order=1, mode="reflect").reshape(shape)
    return np.clip(out, 0, 1) * 255
