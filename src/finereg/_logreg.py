"""Multinomial logistic regression with an L2 penalty chosen on held-out data (shared by Co-Tuning and LP-FT).

The model is p(y | x) = softmax(W x + b), W: (classes, features), b: (classes,) or none. For one L2 strength λ::

    W, b = argmin  mean_n CE(W x_n + b, y_n) + (λ/2)·‖W‖²          (b is not penalized)

a convex problem, solved by L-BFGS with a strong-Wolfe line search in the inputs' dtype. :func:`l2_path` fits a
grid of λ from the strongest to the weakest, each fit warm-started from the previous one, and scores each on
held-out data (negative log-likelihood and accuracy). :func:`stratified_split` holds out a fraction of each class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import FineregError
from ._utils import class_ranks

__all__ = ["stratified_split", "fit_logreg", "l2_path", "PathPoint", "check_grid"]


def stratified_split(labels: Tensor, n_classes: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Boolean mask of held-out samples: ``round(fraction·n_c)`` per class, at least 1 where a class has two
    or more samples, never all of a class (the first of a random order of each class)."""
    rank = class_ranks(labels, n_classes, generator=generator)
    counts = torch.bincount(labels, minlength=n_classes)
    n_hold = torch.clamp(torch.round(counts.double() * fraction).long(), min=1)
    n_hold = torch.minimum(n_hold, counts - 1)
    return rank < n_hold[labels]


def fit_logreg(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    l2: float,
    init: Tensor | None,
    max_iter: int,
    *,
    bias: bool = False,
) -> Tensor:
    """argmin mean CE + (l2/2)‖W‖² by L-BFGS. Returns W (classes, features), or [W | b] (classes, features + 1)
    with ``bias=True``; ``init`` (same shape) warm-starts the fit."""
    d = x.shape[1]
    w = (init.clone() if init is not None else x.new_zeros(n_classes, d + int(bias))).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        if bias:
            loss = F.cross_entropy(x @ w[:, :d].T + w[:, d], y) + 0.5 * l2 * w[:, :d].pow(2).sum()
        else:
            loss = F.cross_entropy(x @ w.T, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def logits(x: Tensor, w: Tensor) -> Tensor:
    """x Wᵀ (+ b when ``w`` holds the bias as its last column)."""
    d = x.shape[1]
    return x @ w.T if w.shape[1] == d else x @ w[:, :d].T + w[:, d]


@dataclass
class PathPoint:
    """One λ of :func:`l2_path`: the fitted weights and their held-out scores."""

    l2: float
    weight: Tensor
    nll: float
    accuracy: float


def check_grid(grid: Sequence[float], name: str = "l2_grid") -> list[float]:
    """The grid as floats, checked: non-empty, finite, ≥ 0."""
    try:
        values = [float(v) for v in grid]
    except (TypeError, ValueError):
        values = []
    if not values or any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise FineregError(f"{name} must be a non-empty list of finite non-negative numbers, got {grid!r}")
    return values


def l2_path(
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    n_classes: int,
    grid: Sequence[float],
    max_iter: int,
    *,
    bias: bool = False,
) -> list[PathPoint]:
    """Fit each λ of ``grid`` (distinct values, strongest first, warm-started) and score it on the held-out
    data. Returns the points in that order."""
    out = []
    w = None
    for l2 in sorted(set(grid), reverse=True):
        w = fit_logreg(x_train, y_train, n_classes, l2, w, max_iter, bias=bias)
        z = logits(x_val, w)
        out.append(PathPoint(l2, w, float(F.cross_entropy(z, y_val)), float((z.argmax(1) == y_val).double().mean())))
    return out
