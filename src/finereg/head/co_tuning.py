"""Co-Tuning (You, Kou, Long & Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020).

Fine-tuning usually throws the pretrained classifier away. Co-Tuning keeps it: a *category relationship*
p(y_s | y_t) translates each target label into a probability vector over the N_s source classes, and the
source head is trained on those soft labels next to the usual target cross-entropy:

    L = CE(y_t, labels) + λ · CE_soft(y_s, p(y_s | y_t = labels))
    CE_soft(z, q) = mean over the batch of  −Σ_s q_s · log softmax(z)_s          (co_tuning_loss)

The relationship (an N_t × N_s row-stochastic matrix) is learned once, before training, from the pretrained
model's predictions on the target training data:

(a) direct (tllib's approach)::

        p(y_s | y_t = i) = mean of p(y_s | x) over the target samples x of class i

(b) calibrated reverse approach (the paper's): learn p(y_t | y_s) and invert it with Bayes' rule,

        1. fit a multinomial logistic regression  p(y_t | p_s) = softmax(W p_s)  (W: N_t × N_s, no intercept:
           the inputs sum to one, so an intercept adds nothing) by minimizing
           mean CE + (λ/2)‖W‖², with λ chosen on a stratified held-out split by its negative log-likelihood;
        2. calibrate a temperature T > 0 on the held-out split: minimize its NLL of softmax(W p_s / T) over
           log T (LBFGS);
        3. refit W on all the data with the chosen λ; p(y_t | y_s = s) = softmax(W e_s / T) (the model at the
           one-hot source class s);
        4. Bayes: p(y_s | y_t) ∝ p(y_t | y_s) · p(y_s), with the source marginal p(y_s) = mean of the source
           predictions over the data; each row normalized over s.

Both are cached on disk under a key of the model's state and the data (:meth:`CategoryRelationship.from_loader`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_choice, check_int, check_number
from .._logreg import fit_logreg as _fit_logreg
from .._logreg import l2_path
from .._logreg import stratified_split as _stratified_split
from .._utils import unwrap
from ._cache import cached, loader_fingerprint, make_key, module_fingerprint
from ._source import collect_source_outputs

__all__ = [
    "co_tuning_loss",
    "CoTuningLoss",
    "direct_relationship",
    "reverse_relationship",
    "ReverseFit",
    "collect_source_outputs",
    "class_mean_rows",
    "CategoryRelationship",
    "CoTuning",
]

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# --------------------------------------------------------------------------------------------------- loss
def co_tuning_loss(source_logits: Tensor, target_probs: Tensor) -> Tensor:
    """mean over the batch of −Σ_s target_probs[b, s] · log_softmax(source_logits)[b, s] (tllib's value)."""
    if not (isinstance(source_logits, Tensor) and isinstance(target_probs, Tensor)):
        raise FineregTypeError("source_logits and target_probs must be tensors")
    if source_logits.dim() != 2 or source_logits.shape != target_probs.shape:
        raise FineregError(
            "source_logits and target_probs must both be (batch, N_s) with the same shape, got "
            f"{tuple(source_logits.shape)} and {tuple(target_probs.shape)}"
        )
    _refuse_empty(source_logits, "co_tuning_loss")
    return -(target_probs * F.log_softmax(source_logits, dim=-1)).sum(-1).mean()


def _refuse_empty(logits: Tensor, what: str) -> None:
    if logits.shape[0] == 0:
        raise FineregError(
            f"{what} got an empty batch: its batch mean is undefined; skip empty batches (e.g. DataLoader(..., "
            "drop_last=True))"
        )


class CoTuningLoss(nn.Module):
    """``CoTuningLoss()(source_logits, target_probs)``: soft-label cross-entropy, see :func:`co_tuning_loss`."""

    def forward(self, source_logits: Tensor, target_probs: Tensor) -> Tensor:
        return co_tuning_loss(source_logits, target_probs)


# ------------------------------------------------------------------------------------------- validation
def _check_inputs(source: Tensor, labels: Tensor, num_target_classes: int | None, what: str) -> int:
    """Validate (N, N_s) source outputs and (N,) labels; return N_t. Every class 0..N_t-1 needs a sample."""
    if not isinstance(source, Tensor) or not isinstance(labels, Tensor):
        raise FineregTypeError(f"{what} and target_labels must be tensors")
    if source.dim() != 2 or not source.is_floating_point():
        raise FineregError(
            f"{what} must be a floating (N, N_s) tensor, got {source.dtype} of shape {tuple(source.shape)}"
        )
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise FineregError(
            f"target_labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if len(labels) != len(source):
        raise FineregError(f"{what} has {len(source)} rows but there are {len(labels)} target labels")
    if len(labels) == 0:
        raise FineregError("no samples: the relationship needs at least one sample per target class")
    if not torch.isfinite(source).all():
        raise FineregError(f"{what} contains NaN or inf")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise FineregError(f"target labels must be >= 0, found {lo}")
    if num_target_classes is None:
        num_target_classes = hi + 1
    elif check_int(num_target_classes, "num_target_classes", low=1) <= hi:
        raise FineregError(
            f"target label {hi} is out of range for num_target_classes={num_target_classes} "
            f"(labels must be in 0..{num_target_classes - 1})"
        )
    counts = torch.bincount(labels.cpu(), minlength=num_target_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = empty[:10] + (["..."] if len(empty) > 10 else [])
        raise FineregError(
            f"target class(es) {shown} have no sample, so p(y_s | y_t) is undefined for them; "
            "every class 0..N_t-1 needs at least one sample (check the labels / num_target_classes)"
        )
    return num_target_classes


def _check_probabilities(p: Tensor) -> None:
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones((), dtype=p.dtype), atol=1e-3):
        raise FineregError(
            "source probabilities must be rows of non-negative numbers summing to 1 (a softmax); for raw model "
            "outputs (logits) pass inputs='logits'"
        )


# ------------------------------------------------------------------------------------------ (a) direct
def class_mean_rows(values: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Row c = the mean of ``values`` (N, D) over the samples with label c, and the (num_classes,) counts. One
    ``index_add`` over the samples, no class loop; a class without samples gets a NaN row (0 / 0)."""
    labels = labels.to(values.device)
    sums = values.new_zeros(num_classes, values.shape[1]).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.to(sums.dtype)[:, None], counts


def direct_relationship(
    source: Tensor, target_labels: Tensor, num_target_classes: int | None = None, *, inputs: str = "probabilities"
) -> Tensor:
    """p(y_s | y_t = i) = mean of the source probabilities over the samples of target class i.

    Args:
        source: (N, N_s) outputs of the pretrained model on the target data: probabilities (rows of non-negative
            numbers summing to 1, checked) with ``inputs="probabilities"``, or raw logits with ``inputs="logits"``
            (turned into probabilities with a softmax).
        target_labels: (N,) target labels in 0..N_t-1; every class needs a sample.
        num_target_classes: N_t (default: max label + 1, as tllib).

    Returns:
        (N_t, N_s) tensor; row i is p(y_s | y_t = i).
    """
    check_choice(inputs, "inputs", ("probabilities", "logits"))
    n_t = _check_inputs(source, target_labels, num_target_classes, f"source {inputs}")
    p = torch.softmax(source, dim=1) if inputs == "logits" else source
    if inputs == "probabilities":
        _check_probabilities(p)
    return class_mean_rows(p, target_labels, n_t)[0]


# ----------------------------------------------------------------------------------------- (b) reverse
@dataclass
class ReverseFit:
    """Result of :func:`reverse_relationship` with ``return_details=True``."""

    relationship: Tensor  # (N_t, N_s) p(y_s | y_t)
    target_given_source: Tensor  # (N_s, N_t) calibrated p(y_t | y_s)
    source_marginal: Tensor  # (N_s,) p(y_s)
    weight: Tensor  # (N_t, N_s) logistic-regression weight (refit on all data)
    l2: float  # the chosen L2 strength
    temperature: float  # the calibrated temperature
    holdout_nll: dict  # λ -> held-out NLL (before calibration)
    calibrated_nll: float  # held-out NLL after calibration


def _calibrate_temperature(logits: Tensor, y: Tensor, max_iter: int) -> float:
    """argmin_T NLL(softmax(logits / T), y) over log T by LBFGS."""
    log_t = logits.new_zeros(()).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(torch.exp(log_t.detach()))


def reverse_relationship(
    source: Tensor,
    target_labels: Tensor,
    num_target_classes: int | None = None,
    *,
    inputs: str = "probabilities",
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    return_details: bool = False,
) -> Tensor | ReverseFit:
    """Co-Tuning's calibrated reverse approach: p(y_s | y_t) from a calibrated p(y_t | y_s) and Bayes' rule.

    Steps in the module docstring. Runs in float64 for float64 inputs, else float32.

    Args:
        source: (N, N_s) source probabilities (``inputs='probabilities'``) or logits (``inputs='logits'``,
            turned into probabilities with a softmax) of the pretrained model on the target data.
        target_labels: (N,) target labels in 0..N_t-1; every class needs a sample (two or more to be
            represented in the held-out split).
        num_target_classes: N_t (default: max label + 1).
        l2_grid: candidate L2 strengths λ (of mean CE + λ/2‖W‖²); the best held-out NLL wins.
        holdout_fraction: stratified fraction of each class held out to choose λ and T (default 0.2).
        seed: seed of the split.
        max_iter: LBFGS iterations per fit.
        return_details: return a :class:`ReverseFit` (λ, T, NLLs, p(y_t|y_s), p(y_s)) instead of the tensor.

    Returns:
        (N_t, N_s) tensor, row i = p(y_s | y_t = i).
    """
    if inputs not in ("probabilities", "logits"):
        raise FineregError(f"inputs must be 'probabilities' or 'logits', got {inputs!r}")
    n_t = _check_inputs(source, target_labels, num_target_classes, f"source {inputs}")
    check_number(holdout_fraction, "holdout_fraction", low=0, high=1, low_open=True, high_open=True)
    grid = [float(v) for v in l2_grid]
    if not grid or any(not (v >= 0 and math.isfinite(v)) for v in grid):
        raise FineregError(f"l2_grid must be a non-empty list of finite non-negative numbers, got {l2_grid!r}")
    dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    p = source.detach().to(dtype)
    p = torch.softmax(p, dim=1) if inputs == "logits" else p
    if inputs == "probabilities":
        _check_probabilities(p)
    y = target_labels.to(p.device).long()

    hold = _stratified_split(y.cpu(), n_t, holdout_fraction, torch.Generator().manual_seed(seed)).to(p.device)
    if not hold.any():
        raise FineregError(
            "no class has two or more samples, so nothing can be held out to choose the L2 "
            "strength and the temperature; give more samples or use direct_relationship"
        )
    x_tr, y_tr, x_ho, y_ho = p[~hold], y[~hold], p[hold], y[hold]

    # choose λ on the held-out split: a warm-started path from strong to weak regularization
    path = l2_path(x_tr, y_tr, x_ho, y_ho, n_t, grid, max_iter)
    nll = {pt.l2: pt.nll for pt in path}
    weights = {pt.l2: pt.weight for pt in path}
    best = min(nll, key=lambda k: (nll[k], -k))
    temperature = _calibrate_temperature(x_ho @ weights[best].T, y_ho, max_iter)
    calibrated = float(F.cross_entropy(x_ho @ weights[best].T / temperature, y_ho))

    w_all = _fit_logreg(p, y, n_t, best, weights[best], max_iter)
    target_given_source = torch.softmax(w_all.T / temperature, dim=1)  # (N_s, N_t): model at one-hot e_s
    source_marginal = p.mean(0)
    joint = target_given_source * source_marginal[:, None]  # p(y_t, y_s), (N_s, N_t)
    relationship = (joint / joint.sum(0, keepdim=True)).T.contiguous()
    if not return_details:
        return relationship
    return ReverseFit(relationship, target_given_source, source_marginal, w_all, best, temperature, nll, calibrated)


# ------------------------------------------------------------------------------ relationship container
class CategoryRelationship(nn.Module):
    """The category relationship p(y_s | y_t) as an (N_t, N_s) buffer (moves with ``.to()``, saved in
    ``state_dict``). ``rel[labels]`` (or ``rel(labels)``) gives the soft source labels of a batch.

    Build it from tensors (:meth:`direct` / :meth:`reverse`) or from a model and a loader
    (:meth:`from_loader`, cached on disk).
    """

    relationship: Tensor

    def __init__(self, relationship: Tensor):
        super().__init__()
        if not isinstance(relationship, Tensor) or relationship.dim() != 2 or not relationship.is_floating_point():
            raise FineregError("relationship must be a floating (N_t, N_s) tensor")
        if not torch.allclose(relationship.sum(1), torch.ones((), dtype=relationship.dtype), atol=1e-4):
            raise FineregError("each row of the relationship must be a distribution over source classes (sum 1)")
        self.register_buffer("relationship", relationship.detach().clone())

    @property
    def num_target_classes(self) -> int:
        return self.relationship.shape[0]

    @property
    def num_source_classes(self) -> int:
        return self.relationship.shape[1]

    def forward(self, labels: Tensor) -> Tensor:
        """Rows p(y_s | y_t = labels[b]), shape (b, N_s)."""
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 1:
            raise FineregError("labels must be a 1-D integer tensor")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_target_classes):
            raise FineregError(
                f"target labels must be in 0..{self.num_target_classes - 1} (the relationship has "
                f"{self.num_target_classes} target classes), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return self.relationship[labels.to(self.relationship.device)]

    __getitem__ = forward

    @classmethod
    def direct(
        cls, source: Tensor, target_labels: Tensor, num_target_classes: int | None = None, **kwargs: Any
    ) -> CategoryRelationship:
        return cls(direct_relationship(source, target_labels, num_target_classes, **kwargs))

    @classmethod
    def reverse(
        cls, source: Tensor, target_labels: Tensor, num_target_classes: int | None = None, **kwargs: Any
    ) -> CategoryRelationship:
        return cls(reverse_relationship(source, target_labels, num_target_classes, **kwargs))

    @classmethod
    def from_loader(
        cls,
        model: nn.Module,
        loader: Iterable,
        method: str = "reverse",
        *,
        num_target_classes: int | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        data_key: str | None = None,
        **reverse_kwargs: Any,
    ) -> CategoryRelationship:
        """Run the pretrained classifier ``model`` over the target ``loader`` (deterministic transforms) and
        learn the relationship with ``method`` (``'direct'`` or ``'reverse'``).

        With ``cache_dir`` the result is stored under a key hashing the model's state, the data (or
        ``data_key``, a string naming it, to skip the hashing pass over the loader), the method and its
        options; a rerun with the same inputs loads it without running the model.
        """
        if method not in ("direct", "reverse"):
            raise FineregError(f"method must be 'direct' or 'reverse', got {method!r}")
        if method == "direct" and reverse_kwargs:
            raise FineregTypeError(f"unexpected options for the direct method: {sorted(reverse_kwargs)}")
        if data_key is not None and not isinstance(data_key, str):
            raise FineregTypeError("data_key must be a string")

        def compute() -> dict:
            logits, labels = collect_source_outputs(model, loader, device)
            if method == "direct":
                rel = direct_relationship(logits, labels, num_target_classes, inputs="logits")
            else:
                rel = reverse_relationship(logits, labels, num_target_classes, inputs="logits", **reverse_kwargs)
            return {"relationship": rel}

        key = ""
        if cache_dir is not None:
            key = make_key(
                "co-tuning-relationship",
                module_fingerprint(unwrap(model)),
                data_key if data_key is not None else loader_fingerprint(loader),
                method,
                num_target_classes,
                {k: reverse_kwargs[k] for k in sorted(reverse_kwargs)},
            )
        return cls(cached(cache_dir, f"relationship-{method}", key, compute)["relationship"])


class CoTuning(nn.Module):
    """The Co-Tuning regularizer: ``CoTuning(relationship)(source_logits, target_labels)`` =
    co_tuning_loss(source_logits, p(y_s | y_t = target_labels)).

    Args:
        relationship: a :class:`CategoryRelationship` or an (N_t, N_s) tensor.
    """

    def __init__(self, relationship: CategoryRelationship | Tensor):
        super().__init__()
        self.relationship = (
            relationship if isinstance(relationship, CategoryRelationship) else CategoryRelationship(relationship)
        )

    def forward(self, source_logits: Tensor, target_labels: Tensor) -> Tensor:
        if source_logits.dim() != 2 or source_logits.shape[1] != self.relationship.num_source_classes:
            raise FineregError(
                f"source_logits must be (batch, {self.relationship.num_source_classes}) to match the "
                f"relationship's source classes, got {tuple(source_logits.shape)}"
            )
        if len(target_labels) != len(source_logits):
            raise FineregError(f"{len(source_logits)} source outputs but {len(target_labels)} target labels")
        target = self.relationship(target_labels).to(device=source_logits.device, dtype=source_logits.dtype)
        return co_tuning_loss(source_logits, target)
