"""Selective Projection Decay (SPD) around any torch optimizer.

Tian, Huang, Kira. "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models", NeurIPS 2024
(official code: GT-RIPL/Selective-Projection-Decay, ``AdamSPD``).

Per tensor, with θ the value before the step, g its gradient, θ̃ the inner optimizer's new value and θ0 the
anchor (the pretrained value)::

    c = −⟨g, θ − θ0⟩
    if c < 0:                                            # the selection: the loss would fall towards θ0
        r = clamp((‖θ̃ − θ0‖ − ‖θ − θ0‖) / ‖θ̃ − θ0‖, 0, 1)     # L2 norms of the whole tensor
        θ ← θ̃ − λ · r · (θ̃ − θ0)
    else:
        θ ← θ̃

λ is the group's ``spd_weight_decay`` (not multiplied by the learning rate, as in ``AdamSPD``). Wrapping
``torch.optim.Adam(..., weight_decay=0)`` gives ``AdamSPD``'s trajectory (tested on the golden trajectory to
1e-6 in float64); any other optimizer (SGD, AdamW, fused / foreach forms) gets the same projection after its
own step.

``anchors="zero"`` is the official parameter-efficient mode (θ0 = 0, no copy of the weights: for adapters such
as LoRA, whose trained tensors start at zero). Parameters without an anchor (a name-matched anchor that lacks
them, or ``exclude``) take the inner step only.

One difference from ``AdamSPD``: where θ̃ = θ0 exactly (‖θ̃ − θ0‖ = 0) the ratio is 0, where the official
code divides by zero and writes NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import FineregError, check_number
from ._base import Anchors, Bucket, WrappedOptimizer, tensor_dots

__all__ = ["SPD"]


class SPD(WrappedOptimizer):
    """Selective Projection Decay after each step of ``optimizer`` (see the module docstring).

    Args:
        optimizer: any torch optimizer over the parameters to fine-tune (give it ``weight_decay=0``: SPD
            replaces weight decay).
        anchors: θ0: ``None`` (the values when wrapped), ``"zero"``, a list per parameter, or a model / state dict
            matched by name (see :mod:`finereg.optim._base`).
        weight_decay: λ, the strength of the projection (group key ``spd_weight_decay``; a group may set its own).
            Required: the official ``AdamSPD`` defaults to 0 (SPD off); its README takes λ from the command line.
            A step where λ·r > 2 (the projection would push θ farther from θ0 than θ̃) is refused before any
            projection is written; λ <= 2 never triggers it (r <= 1).
        model: the model being trained, to name the parameters (for name-matched anchors or ``exclude`` patterns
            when the optimizer was not built from ``named_parameters()``).
        exclude: glob patterns or parameters left to the inner optimizer alone.

    Example::

        opt = finereg.optim.SPD(torch.optim.Adam(model.parameters(), lr=1e-4), weight_decay=0.5)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        anchors: Anchors = None,
        *,
        weight_decay: float,
        model: nn.Module | None = None,
        exclude: Any = (),
    ):
        lam = check_number(weight_decay, "weight_decay", low=0)
        super().__init__(optimizer, anchors, hyper={"spd_weight_decay": lam}, model=model, exclude=exclude)

    def _before(self, buckets: list[Bucket]) -> list[tuple | None]:
        out: list[tuple | None] = []
        for b in buckets:
            if b.kind == "none":
                out.append(None)
                continue
            d = b.params if b.kind == "zero" else torch._foreach_sub(b.params, b.anchors)
            selected = tensor_dots(b.grads, d) > 0  # c = −⟨g, θ − θ0⟩ < 0
            out.append((selected, torch.stack(torch._foreach_norm(d))))
        return out

    def _after(self, buckets: list[Bucket], context: list[tuple | None]) -> None:
        plan = []
        for b, ctx in zip(buckets, context):
            if ctx is None:
                continue
            selected, before = ctx
            lam = self._hyper(b.group, "spd_weight_decay")
            d = b.displacement()
            after = torch.stack(torch._foreach_norm(d))
            ratio = torch.where(after > 0, (after - before) / after, 0.0).clamp(0.0, 1.0)
            coef = ratio.mul_(selected.to(ratio.dtype)).mul_(-lam)
            if not isinstance(lam, torch.Tensor) and lam > 2:  # r <= 1: only λ > 2 can give λ·r > 2 (a sync then)
                worst = float(coef.min()) if len(coef) else 0.0
                if -worst > 2:
                    raise FineregError(_reversed(b.index, lam, -worst))
            plan.append((b, d, coef))
        for b, d, coef in plan:  # every bucket checked before any is written
            torch._foreach_mul_(d, list(coef.unbind()))
            torch._foreach_add_(b.params, d)


def _reversed(index: int, lam: float, worst: float) -> str:
    return (
        f"SPD's projection θ ← θ̃ − λ·r·(θ̃ − θ0) would push a parameter of param_groups[{index}] away from θ0: "
        f"λ·r = {worst:.4g} > 2 (λ = spd_weight_decay = {lam:g}, r = the tensor's growth ratio this step, in "
        "[0, 1]) reverses the pull. The weights hold the inner optimizer's step, not projected. Lower "
        "spd_weight_decay: with λ <= 2 the pull is never reversed"
    )
