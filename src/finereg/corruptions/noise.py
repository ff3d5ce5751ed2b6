"""The noise family of CIFAR-10-C: Gaussian, shot (Poisson) and impulse (salt-and-pepper) noise, and the extra
speckle noise.

Each function takes the uint8 32 x 32 x 3 image, the severity (1-5) and a ``numpy.random.Generator`` and returns
the official float output in [0, 255] (``x`` below is the image in [0, 1], float64; ``c`` the severity's
parameter); :func:`finereg.corruptions.corrupt` stores it with the official truncating cast.

=============== ============================================ =====================================
corruption      recipe                                       c for severities 1-5
=============== ============================================ =====================================
gaussian_noise  ``clip(x + N(0, c²), 0, 1)`` per value       std 0.04, 0.06, 0.08, 0.09, 0.10
shot_noise      ``clip(Poisson(c·x) / c, 0, 1)`` per value   photons 500, 250, 100, 75, 50
impulse_noise   salt-and-pepper on a fraction ``c``          amount 0.01, 0.02, 0.03, 0.05, 0.07
speckle_noise   ``clip(x + x·N(0, c²), 0, 1)`` per value     std 0.06, 0.10, 0.12, 0.16, 0.20
=============== ============================================ =====================================

Impulse noise follows scikit-image's ``random_noise(mode='s&p', amount=c)`` (what the official script calls) as
today's scikit-image draws it: every value (each channel of each pixel on its own) is hit with probability ``c``;
a hit value becomes 1 (salt) or 0 (pepper) with equal probability. Values already at 0 or 1 can be hit without
changing, so the fraction of changed values is slightly below ``c``.
"""

from __future__ import annotations

import numpy as np

from ._common import to_unit

__all__ = [
    "GAUSSIAN_NOISE",
    "SHOT_NOISE",
    "IMPULSE_NOISE",
    "SPECKLE_NOISE",
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
]

GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of the additive noise, image in [0, 1]
SHOT_NOISE = (500, 250, 100, 75, 50)  # photon count of a full-scale value
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values hit
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)  # std of the multiplicative noise


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of std ``GAUSSIAN_NOISE[severity - 1]``, clipped to [0, 1], times 255."""
    c = GAUSSIAN_NOISE[severity - 1]
    x = to_unit(image)
    return np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon) noise: each value is a Poisson count of mean ``c·x`` divided by ``c``
    (``c = SHOT_NOISE[severity - 1]``), clipped to [0, 1], times 255; fewer photons, more noise."""
    c = SHOT_NOISE[severity - 1]
    x = to_unit(image)
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: each value is hit with probability ``c = IMPULSE_NOISE[severity - 1]``; a hit value
    becomes 1 or 0 with probability 1/2 each (scikit-image's ``s&p`` with ``salt_vs_pepper=0.5``); times 255."""
    c = IMPULSE_NOISE[severity - 1]
    x = to_unit(image).copy()
    hit = rng.random(x.shape) <= c
    salt = rng.random(x.shape) <= 0.5
    x[hit & salt] = 1.0
    x[hit & ~salt] = 0.0
    return np.clip(x, 0, 1) * 255


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative Gaussian noise ``x + x·n`` with ``n ~ N(0, c²)``, ``c = SPECKLE_NOISE[severity - 1]``,
    clipped to [0, 1], times 255."""
    c = SPECKLE_NOISE[severity - 1]
    x = to_unit(image)
    return np.clip(x + x * rng.normal(scale=c, size=x.shape), 0, 1) * 255
