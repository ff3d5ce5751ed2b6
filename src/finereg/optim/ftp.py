"""Fast Trainable Projection (FTP) around any torch optimizer.

Tian, Huang, Kira. "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023 (official code:
GT-RIPL/FTP ``util/FTP.py``: ``FTP``, ``SGDP``, ``AdamP``).

Each tensor θ (anchor θ0) has a radius γ, learned on the fly from the training gradient. At its k-th step, with
θ̃ the inner optimizer's new value and c = θ̃ − θ0::

    k = 1:   γ = 1e-8                                   (the first step projects θ̃ almost onto θ0)
    k > 1:   h = Σ_rows ⟨g_r, c'_r⟩ / ‖c'_r‖            (hyper-gradient: g the current gradient, c' the previous
                                                          step's displacement and row norms)
             h ← κ · h  if h > 0                          (κ = ``k``, "gradient annealing" of positive h)
             m ← β1·m + (1 − β1)·h,   v ← β2·v + (1 − β2)·h²
             γ ← γ − μ · (m / (1 − β1^k)) / (sqrt(v / (1 − β2^k)) + 1e-8)
             γ ← clamp(γ, 1e-8, max_rows ‖c_r‖)
    θ ← θ0 + clamp(γ / ‖c_r‖, 0, 1) · c_r               (per row r; norms of c carry + 1e-8)

μ = 1e-2 (``mu``), β = (0.9, 0.999), norm MARS (per-row L1; :mod:`finereg.optim._projection`). The bias
corrections use k, the tensor's step count including its first step (the official global counter ``t``: the
first update of γ, at k = 2, divides m by 1 − β1²).

Wrapping ``torch.optim.SGD`` gives the official ``SGDP``, ``torch.optim.AdamW`` the official ``AdamP`` (its
``lr·wd·θ`` decay is AdamW's), tested on the golden trajectories to 1e-6 in float64.

Differences from the official code, on purpose: (1) the state (θ0, γ, m, v, c', the row norms) is per tensor
in ``state_dict()``; the official optimizer keeps it in Python lists outside it, so a resumed run restarts γ;
(2) a parameter without a gradient is skipped with its state intact; the official code indexes its lists by a
running counter that then shifts every later tensor's state onto the wrong tensor; (3) the step count k is per
tensor (the official ``t`` is global; they agree while every tensor has a gradient at every step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_number
from ._base import Anchors, Bucket, WrappedOptimizer, tensor_dots
from ._projection import NORMS, RowLayout

__all__ = ["FTP"]

EPS = 1e-8
BETAS = (0.9, 0.999)


class FTP(WrappedOptimizer):
    """Fast Trainable Projection after each step of ``optimizer`` (see the module docstring).

    Args:
        optimizer: any torch optimizer (the paper's: SGD with momentum, or AdamW).
        anchors: θ0 (``None``: the values when wrapped; a list; a model / state dict by name).
        k: κ, the factor on positive hyper-gradients (group key ``ftp_k``; official default 1.0).
        mu: μ, the learning rate of γ's Adam (group key ``ftp_mu``; official 1e-2).
        norm: ``"mars"`` (official) or ``"l2"`` (whole-tensor norm).
        model: the model being trained, to name parameters (for name-matched anchors or ``exclude`` patterns).
        exclude: glob patterns or parameters that take the inner step only (the official scripts exclude the
            new classifier head).

    Example::

        opt = finereg.optim.FTP(torch.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9),
                                exclude=["fc.*"])
    """

    _param_state = ("anchor", "scaled_displacement")
    _scalar_state = ("gamma", "exp_avg", "exp_avg_sq")
    _int_state = ("step",)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        anchors: Anchors = None,
        *,
        k: float = 1.0,
        mu: float = 1e-2,
        norm: str = "mars",
        model: nn.Module | None = None,
        exclude: Any = (),
    ):
        hyper = {"ftp_k": check_number(k, "k", low=0), "ftp_mu": check_number(mu, "mu", low=0)}
        self.norm = check_choice(norm, "norm", NORMS)
        super().__init__(optimizer, anchors, hyper=hyper, model=model, exclude=exclude, allow_zero=False)

    def _before(self, buckets: list[Bucket]) -> list[Any]:
        """The hyper-gradient of each tensor that has stepped before (needs the gradient before the inner step)."""
        out = []
        for b in buckets:
            seen = [i for i, s in enumerate(b.states) if "gamma" in s]
            if b.kind != "tensor" or not seen:
                out.append(None)
                continue
            h = tensor_dots([b.params[i].grad for i in seen], [b.states[i]["scaled_displacement"] for i in seen])
            out.append((seen, h))
        return out

    def _after(self, buckets: list[Bucket], context: list[Any]) -> None:
        for b, ctx in zip(buckets, context):
            if b.kind != "tensor":
                continue
            layout = RowLayout(b.params, self.norm)
            c = b.displacement()
            norms = layout.norms(c).add_(EPS)
            gamma = torch.full((len(b.params),), EPS, dtype=norms.dtype, device=norms.device)
            if ctx is not None:
                seen, h = ctx
                gamma[seen] = self._update_gamma(b, seen, h, layout.tensor_max(norms)[seen])
            else:
                seen = []
            for i, s in enumerate(b.states):  # first step of a tensor: γ = 1e-8, empty moments
                if i not in seen:
                    s["step"] = 1
                    s["exp_avg"] = norms.new_zeros(())
                    s["exp_avg_sq"] = norms.new_zeros(())
            for s, g in zip(b.states, gamma.unbind()):
                s["gamma"] = g
            ratio = (layout.to_rows(gamma) / norms).clamp_(0.0, 1.0)
            scaled = torch._foreach_div(c, layout.factors(norms))  # c / ‖c_r‖ for the next hyper-gradient
            for s, t in zip(b.states, scaled):
                s["scaled_displacement"] = t
            torch._foreach_mul_(c, layout.factors(ratio))
            torch._foreach_add_(c, b.anchors)
            torch._foreach_copy_(b.params, c)

    def _update_gamma(self, b: Bucket, seen: list[int], h: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
        """One Adam step on the radii of the tensors in ``seen`` (vectorized over them), then the clip."""
        states = [b.states[i] for i in seen]
        kappa, mu = self._hyper(b.group, "ftp_k"), self._hyper(b.group, "ftp_mu")
        h = torch.where(h > 0, h * kappa, h)
        b1, b2 = BETAS
        m = torch.stack([s["exp_avg"] for s in states]).mul_(b1).add_(h, alpha=1 - b1)
        v = torch.stack([s["exp_avg_sq"] for s in states]).mul_(b2).addcmul_(h, h, value=1 - b2)
        steps = [s["step"] + 1 for s in states]
        bc1 = torch.tensor([1 - b1**t for t in steps], dtype=m.dtype, device=m.device)
        bc2 = torch.tensor([1 - b2**t for t in steps], dtype=m.dtype, device=m.device)
        gamma = torch.stack([s["gamma"] for s in states])
        gamma = gamma - mu * (m / bc1) / ((v / bc2).sqrt() + EPS)
        gamma = torch.minimum(gamma.clamp_min(EPS), max_norm)
        for s, t, mi, vi in zip(states, steps, m.unbind(), v.unbind()):
            s["step"], s["exp_avg"], s["exp_avg_sq"] = t, mi, vi
        return gamma
