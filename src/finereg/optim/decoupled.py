"""L2-SP as decoupled decay towards the pretrained weights, inside any torch optimizer's step.

L2-SP (Li, Grandvalet, Davoine, ICML 2018) adds α/2·‖θ − θ0‖² + β/2·‖θ_new‖² to the loss. As AdamW decouples
weight decay from the gradient (Loshchilov & Hutter, ICLR 2019), the same pull can be applied to the weights
directly, scaled by the learning rate η of the parameter's group, just before the inner step::

    θ ← θ − η·α·(θ − θ0)      (anchored parameters: a lerp towards θ0)
    θ ← θ − η·β·θ             (new parameters, without an anchor: plain decoupled weight decay)
    θ ← inner_step(θ)         (its own update from the gradient of the task loss alone)

When it equals the loss-term L2-SP (:class:`finereg.L2SP`): under plain SGD (no momentum, no weight decay) the
two give the same trajectory, θ − η·(g + α·(θ − θ0)) (tested). Under momentum the loss term's pull also
accumulates in the momentum buffer (a steady pull ≈ 1/(1 − momentum) times stronger); under Adam / AdamW the
loss term's pull is divided by sqrt(v) with the task gradient, so coordinates with large gradients are barely
pulled back and quiet ones strongly, while the decoupled pull is the same fraction η·α of the distance
everywhere. Hence α differs between the two forms: the decoupled α is per unit of learning rate (as AdamW's
``weight_decay``).

Cost. The eager form is one extra multi-tensor pass (``_foreach_lerp_``: read θ and θ0, write θ) before the
inner step. Under ``torch.compile`` of the step (``torch.compile(opt.step)``) the lerp fuses into the inner
optimizer's update and costs one extra read of θ0 (``benchmarks/bench_decoupled_l2sp.py`` measures both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import FineregError, check_number
from ._base import Anchors, Bucket, WrappedOptimizer

__all__ = ["DecoupledL2SP"]


class DecoupledL2SP(WrappedOptimizer):
    """Decoupled L2-SP: θ ← θ − η·α·(θ − θ0) (and θ ← θ − η·β·θ without an anchor) before each inner step.

    Args:
        optimizer: any torch optimizer (keep its own ``weight_decay`` at 0 unless you want both).
        anchors: θ0: ``None`` (the values when wrapped), a list per parameter, or the source model / its state
            dict matched by name (a parameter the anchors lack, or a ``new_params`` one, is new: decayed by β).
        alpha: α, the pull towards θ0 per unit of learning rate (group key ``l2sp_alpha``). A step with
            lr·α > 1 (the lerp would step past θ0) is refused before anything is written.
        beta: β, the decay of new parameters towards 0 (group key ``l2sp_beta``; default 0); lr·β > 1 likewise.
        model: the model being trained, to name parameters (for name-matched anchors and patterns).
        exclude: glob patterns or parameters left alone (neither α nor β).
        new_params: glob patterns or parameters that are new although the anchors hold a tensor of their name.

    Example::

        opt = finereg.optim.DecoupledL2SP(torch.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9),
                                          anchors=pretrained, alpha=0.1, beta=0.01)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        anchors: Anchors = None,
        *,
        alpha: float,
        beta: float = 0.0,
        model: nn.Module | None = None,
        exclude: Any = (),
        new_params: Any = None,
    ):
        hyper = {"l2sp_alpha": check_number(alpha, "alpha", low=0), "l2sp_beta": check_number(beta, "beta", low=0)}
        super().__init__(
            optimizer,
            anchors,
            hyper=hyper,
            model=model,
            exclude=exclude,
            new_params=new_params,
            allow_zero=False,
        )

    def _before(self, buckets: list[Bucket]) -> None:
        plan = []
        for b in buckets:  # every weight checked before any is written
            lr = b.group["lr"]
            key = "l2sp_alpha" if b.kind == "tensor" else "l2sp_beta"
            w = lr * self._hyper(b.group, key)
            if not isinstance(w, torch.Tensor) and w > 1:
                raise FineregError(_overshoot(b.index, lr, key, self._hyper(b.group, key), w))
            plan.append((b, w))
        for b, w in plan:
            if not isinstance(w, torch.Tensor) and w == 0:
                continue
            if b.kind == "tensor":
                torch._foreach_lerp_(b.params, b.anchors, w)
            else:
                torch._foreach_mul_(b.params, 1 - w)

    def _after(self, buckets: list[Bucket], context: Any) -> None:
        return None


def _overshoot(index: int, lr: float, key: str, value: float, w: float) -> str:
    if key == "l2sp_alpha":
        return (
            f"param_groups[{index}]: lr·alpha = {lr:g}·{value:g} = {w:g} > 1: the decoupled pull "
            "θ ← θ − lr·α·(θ − θ0) would step past θ0 (to its other side; away from it once lr·α > 2). Lower "
            "alpha (l2sp_alpha) so that lr·alpha <= 1: it is per unit of learning rate, as AdamW's weight_decay"
        )
    return (
        f"param_groups[{index}]: lr·beta = {lr:g}·{value:g} = {w:g} > 1: the decay θ ← (1 − lr·β)·θ of the "
        "parameters without an anchor would flip their sign. Lower beta (l2sp_beta) so that lr·beta <= 1"
    )
