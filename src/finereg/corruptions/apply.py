"""The names of the CIFAR-10-C corruptions and the two entry points, :func:`corrupt` (one image) and
:func:`corrupt_many` (a test set, one seeded generator per image)."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._checks import FineregError, FineregTypeError, UnknownNameError, check_int
from . import blur, digital, noise, weather
from ._common import SIZE, store

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "CORRUPTIONS",
    "SEVERITIES",
    "available_corruptions",
    "corrupt",
    "corrupt_many",
    "image_seed",
]

# the order of the official script: the 15 corruptions of the benchmark, then the 4 held-out extras
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

_Function = Callable[[np.ndarray, int, np.random.Generator], Any]
_FUNCTIONS: dict[str, _Function] = {
    name: getattr(module, name)
    for module in (noise, blur, weather, digital)
    for name in module.__all__
    if name in CORRUPTIONS
}
assert set(_FUNCTIONS) == set(CORRUPTIONS)


def available_corruptions() -> tuple[str, ...]:
    """The corruptions :func:`corrupt` can run now: all of :data:`CORRUPTIONS`, less ``frost`` unless
    ``$FINEREG_FROST_DIR`` names a folder with the official frost photographs (see :mod:`.weather`)."""
    try:
        weather.frost_images()
    except FineregError:
        return tuple(n for n in CORRUPTIONS if n != "frost")
    return CORRUPTIONS


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise FineregTypeError(f"name must be a corruption name (a str), got {name!r}")
    if name not in _FUNCTIONS:
        close = difflib.get_close_matches(name, CORRUPTIONS, n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UnknownNameError(f"unknown corruption {name!r}{hint}; the corruptions are: {', '.join(CORRUPTIONS)}")
    return name


def _check_image(image: Any, what: str, batch: bool) -> np.ndarray:
    shape = ("N x " if batch else "") + f"{SIZE} x {SIZE} x 3"
    if not isinstance(image, np.ndarray):
        raise FineregTypeError(f"{what} must be a numpy uint8 array of shape {shape}, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise FineregTypeError(f"{what} must be a numpy uint8 array of shape {shape}, got dtype {image.dtype}")
    if image.shape[int(batch) :] != (SIZE, SIZE, 3) or image.ndim != 3 + int(batch):
        raise FineregError(
            f"{what} must be a numpy uint8 array of shape {shape} (the official parameters are CIFAR's, for "
            f"{SIZE} px RGB images), got shape {tuple(image.shape)}"
        )
    return image


def _rng(seed: Any) -> np.random.Generator:
    if seed is None or isinstance(seed, (np.random.SeedSequence, np.random.Generator)):
        return np.random.default_rng(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise FineregTypeError(
            f"seed must be None, an integer >= 0, a numpy SeedSequence or a numpy Generator, got {seed!r}"
        )
    return np.random.default_rng(int(seed))


def corrupt(image: np.ndarray, name: str, severity: int, seed: Any = None) -> np.ndarray:
    """The CIFAR-10-C corruption ``name`` at ``severity`` (1-5) of one image.

    ``image`` is a uint8 array of shape 32 x 32 x 3 (RGB, as ``torchvision.datasets.CIFAR10.data`` holds them).
    The result is a new uint8 array of the same shape, stored as the official ``make_cifar_c.py`` stores
    CIFAR-10-C: ``np.uint8(function(image, severity))``, a truncating cast of the float output in [0, 255].

    ``seed`` feeds the ``numpy.random.Generator`` of the random corruptions (``np.random.default_rng(seed)``: an
    int >= 0, a ``SeedSequence``, a ``Generator`` used as is, or ``None`` for fresh entropy); the same seed gives
    the same output. The deterministic corruptions ignore it. ``frost`` needs ``$FINEREG_FROST_DIR``
    (:mod:`finereg.corruptions.weather`).

    Unknown names raise an :class:`~finereg._checks.UnknownNameError` listing the names, a severity outside 1-5 or
    an image of another dtype or shape a :class:`~finereg._checks.FineregError`.
    """
    name = _check_name(name)
    severity = check_int(severity, "severity", low=1, high=5)
    image = _check_image(image, "image", batch=False)
    return store(_FUNCTIONS[name](image, severity, _rng(seed)))


def image_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of image ``index`` in :func:`corrupt_many`: ``SeedSequence(seed, spawn_key=(index,))``, the
    ``index``-th child of ``np.random.SeedSequence(seed).spawn(n)`` for any ``n > index``."""
    return np.random.SeedSequence(seed, spawn_key=(index,))


def _per_image(value: Any, n: int, what: str, kind: type | tuple[type, ...]) -> list[Any]:
    if isinstance(value, kind):
        return [value] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise FineregTypeError(f"{what} must be a sequence with one entry per image, got {type(value).__name__}")
    if len(value) != n:
        raise FineregError(f"{what} must have one entry per image ({n}), got {len(value)}")
    return list(value)


def corrupt_many(images: np.ndarray, names: Sequence[str], severities: Sequence[int], seed: int) -> np.ndarray:
    """A corrupted copy of a test set: image ``i`` corrupted by ``names[i]`` at ``severities[i]``.

    ``images`` is a uint8 array N x 32 x 32 x 3; ``names`` and ``severities`` hold one entry per image (a single
    name or severity applies to all). Image ``i`` draws its random numbers from its own generator, seeded by
    :func:`image_seed` ``(seed, i)`` = ``SeedSequence(seed, spawn_key=(i,))``, i.e. the ``i``-th child of
    ``np.random.SeedSequence(seed).spawn(N)``: its result is
    ``corrupt(images[i], names[i], severities[i], seed=image_seed(seed, i))`` and does not depend on the other
    images, on N or on the order of the names. Returns a new uint8 array N x 32 x 32 x 3.
    """
    images = _check_image(images, "images", batch=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise FineregTypeError(f"seed must be an integer >= 0, got {seed!r}")
    n = len(images)
    names = [_check_name(x) for x in _per_image(names, n, "names", str)]
    per_image = _per_image(severities, n, "severities", numbers.Integral)
    severities = [check_int(s, f"severities[{i}]", low=1, high=5) for i, s in enumerate(per_image)]
    if "frost" in names:
        weather.frost_images()  # fail before any work when the photographs are missing
    out = np.empty_like(images)
    for i, (image, name, severity) in enumerate(zip(images, names, severities)):
        rng = np.random.default_rng(image_seed(int(seed), i))
        out[i] = store(_FUNCTIONS[name](image, severity, rng))
    return out
