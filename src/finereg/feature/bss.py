"""Batch Spectral Shrinkage (BSS): shrink the smallest singular values of the batch feature matrix.

Chen, Wang, Fu, Long, Wang. "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage
for Safe Transfer Learning", NeurIPS 2019.

For a batch feature matrix F (b × d: one row per sample) with singular values σ_1 ≥ … ≥ σ_m,
m = min(b, d)::

    L_bss(F) = Σ_{i=1..k} σ_{m+1-i}²          (the k smallest squared singular values)

    ∂L/∂F = Σ_{i=1..k} 2 σ_{m+1-i} u_{m+1-i} v_{m+1-i}ᵀ

The loss is added to the task loss with a small weight (e.g. 0.001). :func:`batch_spectral_shrinkage` computes
it by ``method``:

* ``"gram"`` (the default, what ``"auto"`` picks): the squared singular values are the eigenvalues of the
  Gram matrix of the short side, G = F Fᵀ (b × b) if b ≤ d, else Fᵀ F (d × d). G is formed in **float64**
  (whatever F's dtype), its k smallest eigenvectors Q_k are found with ``torch.linalg.eigh`` outside the
  autograd graph, and the loss is the Rayleigh quotient ``‖Q_kᵀ F‖²`` (b ≤ d; ``‖F Q_k‖²`` otherwise),
  evaluated with autograd. Its value is Σ λ_i exactly, and its gradient 2 Q_k Q_kᵀ F is the exact gradient
  of Σ λ_i (dλ = qᵀ dG q involves no derivative of q), i.e. the Σ 2 σ u vᵀ that the SVD gives. The result is
  cast back to F's dtype. Each squared singular value is exact to ~1e-16 · σ_max² (absolute).
* ``"svdvals"``: ``torch.linalg.svdvals(F)`` in F's dtype, k smallest squared.
* ``"svd"``: ``torch.svd(F.t())``, the singular values of the SVD (tllib's computation).

Not differentiable twice: the ``"gram"`` gradient is exact, but its graph holds Q_k as a constant, so a
second derivative would miss the eigenvector terms; use ``method="svd"``. Speed and precision measurements:
docs/feature_penalties.md.

Non-finite features are an error naming the samples (the singular values are undefined).

k must be smaller than min(b, d): with k = min(b, d) the loss would be ‖F‖² (every singular value), and beyond
there are fewer than k singular values; both are errors (a last batch of at most k samples is the usual cause:
use ``DataLoader(..., drop_last=True)``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_int

__all__ = ["batch_spectral_shrinkage", "BSS", "BSS_METHODS"]

Method = Literal["auto", "gram", "svdvals", "svd"]
BSS_METHODS: tuple[str, ...] = ("auto", "gram", "svdvals", "svd")


def _check(features: Tensor, k: int, method: str) -> None:
    if not isinstance(features, Tensor):
        raise FineregTypeError(
            f"BSS expects the batch features as a tensor of shape (batch, dim), got {type(features).__name__}"
        )
    if features.dim() != 2:
        raise FineregError(
            f"BSS expects features of shape (batch, dim), got a {features.dim()}-D tensor of shape "
            f"{tuple(features.shape)}; flatten or pool them first, e.g. features.flatten(1)"
        )
    if not features.is_floating_point():
        raise FineregTypeError(f"BSS needs floating-point features, got {features.dtype}")
    _check_k(k)
    m = min(features.shape)
    if k >= m:
        raise FineregError(
            f"BSS k={k} must be smaller than min(batch, dim) = min{tuple(features.shape)} = {m}: the features have "
            f"only {m} singular values and penalizing all of them is just ‖F‖²; use a smaller k or larger "
            "batches (a small last batch is the usual cause: DataLoader(..., drop_last=True))"
        )
    if method not in BSS_METHODS:
        raise FineregError(f"unknown BSS method {method!r}; choose one of {', '.join(map(repr, BSS_METHODS))}")


def _check_k(k: int) -> None:
    if isinstance(k, float):  # check_int accepts 2.0; k counts singular values, an int is expected
        raise FineregTypeError(f"BSS k (how many of the smallest singular values to shrink) must be an int, got {k!r}")
    check_int(k, "BSS k (how many of the smallest singular values to shrink)", low=1)


def _gram(features: Tensor, k: int) -> Tensor:
    x = features.to(torch.float64)
    wide = x.shape[0] <= x.shape[1]  # b ≤ d: the b × b Gram F Fᵀ, else the d × d Gram Fᵀ F
    with torch.no_grad():
        gram = x @ x.T if wide else x.T @ x
        # a NaN or inf feature makes its row's Σx² (a diagonal entry) NaN or inf: one cheap check of b or d values
        if not torch.isfinite(gram.diagonal()).all():
            _refuse_non_finite(features)
        q = torch.linalg.eigh(gram).eigenvectors[:, :k]  # ascending: the k smallest
    proj = q.T @ x if wide else x @ q  # ‖proj‖² = Σ of the k smallest eigenvalues (Rayleigh quotients)
    return proj.square().sum().to(features.dtype)


def _refuse_non_finite(features: Tensor) -> None:
    bad = ~torch.isfinite(features)
    if bad.any():
        rows = torch.nonzero(bad.any(1)).flatten().tolist()
        raise FineregError(
            f"BSS features are not finite: NaN or inf in the features of sample(s) {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''}; the singular values are undefined (check the model's outputs)"
        )
    raise FineregError("BSS features are too large to square in float64 (the Gram matrix overflows); scale them down")


def batch_spectral_shrinkage(features: Tensor, k: int = 1, method: Method = "auto") -> Tensor:
    """Σ of the ``k`` smallest squared singular values of ``features`` (b × d), differentiable.

    Args:
        features: the batch feature matrix, one row per sample (any floating dtype).
        k: how many of the smallest singular values to penalize; 1 ≤ k < min(b, d).
        method: ``"auto"`` (= ``"gram"``), ``"gram"``, ``"svdvals"`` or ``"svd"`` (tllib's); see the module doc.

    Returns:
        A scalar of ``features``' dtype.
    """
    _check(features, k, method)
    if method in ("auto", "gram"):
        return _gram(features, k)
    if not torch.isfinite(features).all():  # the SVD paths: checked up front
        _refuse_non_finite(features)
    if method == "svdvals":
        return torch.linalg.svdvals(features)[-k:].square().sum()
    s = torch.svd(features.t()).S  # tllib: singular values in descending order
    return s[-k:].square().sum()


class BSS(nn.Module):
    """Batch Spectral Shrinkage as a module: ``BSS(k)(features)`` → Σ of the k smallest σ² of ``features``.

    See :func:`batch_spectral_shrinkage` for the formula, the methods and their precision. ``features`` are
    the (b, d) features the classifier head reads (tllib: the bottleneck / pooled backbone output).

    Example::

        bss = BSS(k=1)
        f = backbone(x)                        # (b, d)
        loss = ce(head(f), y) + 0.001 * bss(f)
    """

    def __init__(self, k: int = 1, method: Method = "auto"):
        super().__init__()
        _check_k(k)
        if method not in BSS_METHODS:
            raise FineregError(f"unknown BSS method {method!r}; choose one of {', '.join(map(repr, BSS_METHODS))}")
        self.k = k
        self.method = method

    def forward(self, features: Tensor) -> Tensor:
        return batch_spectral_shrinkage(features, self.k, self.method)

    def extra_repr(self) -> str:
        return f"k={self.k}, method={self.method!r}"
