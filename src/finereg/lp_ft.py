"""LP-FT: fit the new head by linear probing on frozen features, then fine-tune everything from it.

Kumar, Raghunathan, Jones, Ma, Liang. "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022 (official code: AnanyaKumar/transfer_learning, ``log_reg_sk.py``).

Stage 1 (:func:`fit_linear_probe`): on features φ(x) of the frozen pretrained backbone, computed once and cached
by the caller, a multinomial logistic regression::

    W, b = argmin  mean_n CE(W φ̂(x_n) + b, y_n) + (λ/2)·‖W‖²,    φ̂ = (φ − μ) / σ

where μ and σ are the mean and standard deviation of all training feature values (one scalar each, as the
official code: it makes one λ grid fit every backbone), λ is chosen on the validation split (by accuracy,
the official criterion, ties going to the stronger λ; or by negative log-likelihood), and (W, b) are mapped
back to raw features: W/σ, b − (W/σ)·μ·1. The fits are L-BFGS runs to convergence on a warm-started path from
the strongest λ (the official code runs scikit-learn's L-BFGS for 20 iterations per C). Without a validation
split, a stratified fraction of the training data is held out to choose λ and the probe is refit on all of it.

Stage 2: copy the probe into the model's head (:meth:`LinearProbe.load_into`) and fine-tune all weights at a
lower learning rate than plain fine-tuning would use (the paper: the feature distortion that fine-tuning from a
random head causes is what LP-FT avoids). :func:`batchnorm_eval_` puts BatchNorm layers in eval mode (call it
after each ``model.train()``), the option of keeping the pretrained statistics during stage 2.

For WiSE-FT of a model without a zero-shot head, the linear probe's head is θ0's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ._checks import FineregError, check_bool, check_choice, check_int, check_number, check_type
from ._logreg import check_grid, fit_logreg, l2_path, stratified_split

__all__ = ["fit_linear_probe", "LinearProbe", "batchnorm_eval_", "DEFAULT_PROBE_L2_GRID"]

DEFAULT_PROBE_L2_GRID = tuple(10.0**e for e in range(-6, 2))


@dataclass
class LinearProbe:
    """A fitted linear head on raw features: logits = features @ weight.T + bias."""

    weight: Tensor  # (classes, features)
    bias: Tensor  # (classes,)
    l2: float  # the chosen λ
    path: list[dict] = field(repr=False)  # per λ tried: l2, val_nll, val_accuracy
    val_accuracy: float = float("nan")

    def logits(self, features: Tensor) -> Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias

    @torch.no_grad()
    def load_into(self, head: nn.Linear) -> nn.Linear:
        """Copy the probe into ``head`` (an ``nn.Linear`` with a bias, of the probe's shape); returns it.

        A parametrized weight or bias is written through its parametrizations when each has a ``right_inverse``
        that reproduces the probe; a partly frozen (:func:`finereg.reparam.freeze`) or weight-standardized
        (:func:`finereg.standardize`) one cannot hold the probe and is refused before anything is written."""
        if not isinstance(head, nn.Linear) or head.bias is None:
            raise FineregError(f"head must be an nn.Linear with a bias, got {head!r}")
        if head.weight.shape != self.weight.shape:
            raise FineregError(
                f"head has shape {tuple(head.weight.shape)} (classes, features), the probe {tuple(self.weight.shape)}"
            )
        writes = [_write_plan(head, name, value) for name, value in (("weight", self.weight), ("bias", self.bias))]
        for target, value in writes:  # every check passed: now write
            target.copy_(value)
        return head

    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding the probe."""
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0], device=self.weight.device, dtype=self.weight.dtype)
        return self.load_into(head)


def _write_plan(head: nn.Linear, name: str, value: Tensor) -> tuple[Tensor, Tensor]:
    """(the tensor to copy into, the value) that makes ``head.<name>`` equal ``value``; through the
    parametrizations of a parametrized tensor (checked: their forward must give ``value`` back)."""
    if not parametrize.is_parametrized(head, name):
        return getattr(head, name), value
    plist = head.parametrizations[name]
    kinds = [type(m).__name__ for m in plist]
    raw = value.to(plist.original)
    for m in reversed(list(plist)):
        if not hasattr(m, "right_inverse"):
            raw = None
            break
        raw = m.right_inverse(raw)
        if not isinstance(raw, Tensor):
            raw = None
            break
    if raw is not None and raw.shape == plist.original.shape:
        out = raw
        for m in plist:
            out = m(out)
        if torch.allclose(out, value.to(out), rtol=1e-5, atol=1e-6):
            return plist.original, raw
    fixes = {
        "PartialFreeze": f"load the probe before freezing, or finereg.unfreeze(head, {name!r}) first",
        "WeightStandardization": "a standardized weight has mean 0 and a fixed scale per class, which the probe's "
        "does not: load the probe before standardize(), or finereg.bake(head) first",
    }
    how = "; ".join(fixes[k] for k in dict.fromkeys(kinds) if k in fixes) or (
        "remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
    )
    raise FineregError(
        f"head.{name} is parametrized ({', '.join(kinds)}): the probe's {name} cannot be written through it and "
        f"nothing was loaded; {how}"
    )


def _labels(y: Tensor, n: int, what: str) -> Tensor:
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or len(y) != n:
        raise FineregError(f"{what} must be a 1-D integer tensor with one label per feature row ({n})")
    return y.long()


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    val_features: Tensor | None = None,
    val_labels: Tensor | None = None,
    *,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_PROBE_L2_GRID,
    select: str = "accuracy",
    normalize: bool = True,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> LinearProbe:
    """LP-FT's stage 1 on cached features (see the module docstring).

    Args:
        features: (N, D) training features of the frozen backbone (float).
        labels: (N,) training labels in 0..classes-1.
        val_features, val_labels: the validation split's features and labels, to choose λ (else a stratified
            ``holdout_fraction`` of the training data is held out, and the probe refit on all of it).
        num_classes: the number of classes (default: the largest label + 1).
        l2_grid: the λ values tried (of mean CE + λ/2·‖W‖² on standardized features).
        select: ``"accuracy"`` (official) or ``"nll"``: the validation criterion; ties go to the stronger λ.
        normalize: standardize the features by their scalar mean and std first (official).
        max_iter: L-BFGS iterations per λ.
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise FineregError("features must be a floating (N, D) tensor of the frozen backbone's features")
    y = _labels(labels, len(features), "labels")
    if (val_features is None) != (val_labels is None):
        raise FineregError("give both val_features and val_labels, or neither")
    _finite(features, "features")
    if num_classes is None and len(y) and torch.unique(y).numel() < 2:
        raise FineregError(
            f"labels hold a single class ({int(y[0])}): a probe needs two classes at least; pass num_classes= "
            "if this split lacks the others"
        )
    n_classes = check_int(num_classes, "num_classes", low=2) if num_classes is not None else int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise FineregError(f"labels must be in 0..{n_classes - 1}, got range [{int(y.min())}, {int(y.max())}]")
    grid = check_grid(l2_grid)
    check_choice(select, "select", ("accuracy", "nll"))
    max_iter = check_int(max_iter, "max_iter", low=1)
    x = features.detach()
    mu, sigma = (x.mean(), x.std(unbiased=False)) if check_bool(normalize, "normalize") else (x.new_zeros(()),) * 2
    if normalize and not sigma > 0:
        raise FineregError("the features are constant (standard deviation 0): nothing to fit a probe on")
    scale = sigma if normalize else x.new_ones(())

    def std(t: Tensor) -> Tensor:
        return (t.detach().to(x) - mu) / scale

    refit = val_features is None
    if refit:
        frac = check_number(holdout_fraction, "holdout_fraction", low=0, high=1, low_open=True, high_open=True)
        hold = stratified_split(y.cpu(), n_classes, frac, torch.Generator().manual_seed(seed)).to(x.device)
        if not hold.any():
            raise FineregError("no class has two samples to hold one out: give val_features / val_labels")
        x_tr, y_tr, x_va, y_va = std(x[~hold]), y[~hold], std(x[hold]), y[hold]
    else:
        if not isinstance(val_features, Tensor) or val_features.dim() != 2 or val_features.shape[1] != x.shape[1]:
            raise FineregError(f"val_features must be a (M, {x.shape[1]}) tensor like features")
        _finite(val_features, "val_features")
        y_va = _labels(val_labels, len(val_features), "val_labels").to(x.device)
        if len(y_va) and (int(y_va.min()) < 0 or int(y_va.max()) >= n_classes):
            raise FineregError(
                f"val_labels must be in 0..{n_classes - 1} like labels, got range [{int(y_va.min())}, "
                f"{int(y_va.max())}]"
                + ("; pass num_classes= if the training split lacks classes" if num_classes is None else "")
            )
        x_tr, y_tr, x_va = std(x), y, std(val_features)
    path = l2_path(x_tr, y_tr, x_va, y_va, n_classes, grid, max_iter, bias=True)
    key = (lambda p: -p.accuracy) if select == "accuracy" else (lambda p: p.nll)
    best = min(path, key=key)  # path runs strongest λ first: min keeps the first of equal scores
    w = fit_logreg(std(x), y, n_classes, best.l2, best.weight, max_iter, bias=True) if refit else best.weight
    d = x.shape[1]
    weight = w[:, :d] / scale
    bias = w[:, d] - weight @ mu.expand(d)
    rows = [{"l2": p.l2, "val_nll": p.nll, "val_accuracy": p.accuracy} for p in path]
    return LinearProbe(weight.contiguous(), bias, best.l2, rows, best.accuracy)


def _finite(x: Tensor, what: str) -> None:
    bad = ~torch.isfinite(x.detach()).all(dim=1)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise FineregError(
            f"{what} hold NaN or inf in {len(rows)} row(s) (first: {rows[:5]}): compute them again, or drop those "
            "samples"
        )


def batchnorm_eval_(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics used, not updated); returns how
    many. ``model.train()`` turns them back: call this after it (LP-FT's stage 2 option)."""
    check_type(model, "model", nn.Module, "an nn.Module")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.eval()
    return len(bns)
