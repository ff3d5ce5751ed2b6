"""A shifted test set: the same images and classes, drawn differently, fixed by a seed.

Distribution shift is what robust fine-tuning is judged on, so every run reports its accuracy on the test split
(in distribution) and on this shifted copy of it. Each image i of the test split gets its own parameters, drawn
from ``torch.Generator().manual_seed(seed)`` (row i of one table, :func:`shift_parameters`), never from the run:

1. rotation by θ_i = ± U(10°, 25°) (random sign) about the image center, and scaling by s_i ~ U(0.85, 1.0)
   (strokes move off the positions the network was trained on);
2. stroke change: a random half is thickened (a k×k max filter, k = 2·max(1, round(size/32)) + 1, i.e. 3×3 at
   32 px), the other half blurred (Gaussian, σ = max(1, size/32) px);
3. additive Gaussian pixel noise, σ = 0.02, then clipping to [0, 1] (small: of the three, pixel noise hurts a
   fine-tuned EfficientNet-Lite0 most; see docs/protocol.md).

Rendering: :func:`finereg.train.imagenet_task.resample`, one ``affine_grid`` + ``grid_sample`` (bilinear, zeros
outside) straight from the native image to ``size × size``; the clean test set goes through the same function
with θ = 0, s = 1 (:func:`~finereg.train.imagenet_task.resize_images`), so the shift is the only difference.
Everything is a batched tensor op (no loop over images). Images are ``(N, H, W)`` in [0, 1], background 0 (MNIST,
scikit-learn's digits); use ``size`` ≥ the native size (upsampling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int, check_number
from .data import derive_seed
from .imagenet_task import resample

__all__ = ["SHIFT_SEED", "shift_parameters", "shifted"]

SHIFT_SEED = 20240610  # the seed of the protocol's shifted test set


def shift_parameters(n: int, seed: int = SHIFT_SEED) -> dict[str, Tensor]:
    """The per-image parameters of the shift: ``angle`` (degrees), ``scale`` and ``thicken`` (bool; else blur).
    Drawn as one ``(n, 4)`` uniform table, row i for image i: the first m images of a longer set get the same
    parameters as a set of m images."""
    n = check_int(n, "n", low=0)
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(check_int(seed, "seed", low=0)))
    sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0)
    return {"angle": sign * (10 + 15 * u[:, 0]), "scale": 0.85 + 0.15 * u[:, 2], "thicken": u[:, 3] < 0.5}


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def shifted(images: Tensor, size: int, seed: int = SHIFT_SEED, *, noise: float = 0.02) -> Tensor:
    """The shifted copy of ``images`` (``(N, H, W)`` in [0, 1]) at ``size × size``: ``(N, 1, size, size)`` in
    [0, 1], deterministic in ``seed`` (see the module docstring)."""
    noise = check_number(noise, "noise", low=0)
    p = shift_parameters(images.shape[0], seed)
    x = resample(images, size, p["angle"], p["scale"])
    k = 2 * max(1, round(size / 32)) + 1
    thick = F.max_pool2d(x, k, stride=1, padding=k // 2)
    blurred = _gaussian_blur(x, max(1.0, size / 32))
    x = torch.where(p["thicken"].view(-1, 1, 1, 1), thick, blurred)
    g = torch.Generator().manual_seed(derive_seed(seed, 1))  # the noise: its own stream
    x = x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x.clamp_(0, 1)
