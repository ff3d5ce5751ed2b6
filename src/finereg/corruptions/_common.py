"""Helpers shared by the corruption families: lazy imports of the optional libraries, the official storage step,
the centre zoom used by zoom blur and snow, and the image-size constant.

The official CIFAR-10-C script turns each function's float output (values in [0, 255]) into the stored bytes with
``np.uint8(...)``: a cast that truncates towards zero (254.9999 -> 254), it does not round. :func:`store` does the
same, so the deterministic corruptions give the stored bytes exactly.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from .._checks import MissingDependencyError

__all__ = [
    "SIZE",
    "store",
    "to_unit",
    "import_cv2",
    "import_skimage",
    "import_ndimage",
    "import_pil",
    "gaussian",
    "clipped_zoom",
]

SIZE = 32  # CIFAR images are 32 x 32; the official parameters are tuned for this size

_PIP = "pip install 'finereg[train]'"


def store(x: Any) -> np.ndarray:
    """The official storage step, ``np.uint8(x)``: a float array in [0, 255] truncated to bytes (a PIL image or a
    uint8 array passes through unchanged)."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr.copy()
    with np.errstate(invalid="ignore"):
        return arr.astype(np.uint8)


def to_unit(image: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """The uint8 image as floats in [0, 1] (``image / 255.``), in ``dtype``: float64 where the official code divides
    a uint8 array by 255., float32 where it first builds a float32 array."""
    if dtype == np.float32:
        return np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return np.asarray(image) / 255.0


def _optional(modules: tuple[str, ...], package: str, pip_name: str, what: str) -> Any:
    """Import ``modules`` (an optional library and the submodules used) and return the first, or raise a
    :class:`MissingDependencyError` naming the wheel to install for the corruption ``what``."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"the corruption {what!r} needs {package}: {_PIP} (or pip install {pip_name})"
        ) from e
    return loaded[0]


def import_cv2(what: str) -> Any:
    """OpenCV (``cv2``), or a :class:`MissingDependencyError` naming the wheel to install."""
    return _optional(("cv2",), "OpenCV", "opencv-python-headless", what)


def import_skimage(what: str) -> Any:
    """scikit-image's ``skimage`` with its ``filters`` and ``color`` modules loaded."""
    return _optional(("skimage", "skimage.color", "skimage.filters"), "scikit-image", "scikit-image", what)


def import_ndimage(what: str) -> Any:
    """``scipy.ndimage``."""
    return _optional(("scipy.ndimage",), "SciPy", "scipy", what)


def import_pil(what: str) -> Any:
    """Pillow's ``PIL.Image``."""
    return _optional(("PIL.Image",), "Pillow", "pillow", what)


def gaussian(x: np.ndarray, sigma: float, what: str, **kw: Any) -> np.ndarray:
    """scikit-image's Gaussian filter (``mode='nearest'``, truncated at 4 sigma unless ``truncate`` is given), over
    the two spatial axes only when ``x`` has a channel axis."""
    sk = import_skimage(what)
    if x.ndim == 3:
        kw.setdefault("channel_axis", -1)
    return sk.filters.gaussian(x, sigma=sigma, **kw)


def clipped_zoom(x: np.ndarray, factor: float, what: str) -> np.ndarray:
    """Zoom into the centre by ``factor`` >= 1 keeping the size: crop the centred ``ceil(h / factor)`` square (its
    top-left corner at ``(h - ch) // 2``), enlarge it by ``factor`` with bilinear interpolation
    (``scipy.ndimage.zoom(order=1)``, channels untouched), and cut the centred ``h x h`` square out of the result."""
    ndimage = import_ndimage(what)
    h = x.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    big = ndimage.zoom(x[top : top + ch, top : top + ch], (factor, factor, 1), order=1)
    trim = (big.shape[0] - h) // 2
    return big[trim : trim + h, trim : trim + h]
