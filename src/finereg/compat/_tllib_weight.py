"""tllib-compatible names for finereg's weight regularizers and BSS (re-exported by finereg.compat.tllib).

Same constructor signatures, call conventions and return values as ``tllib.regularization``:

* ``L2Regularization(model)()``  = Σ over all parameters of 0.5·‖w‖²
* ``SPRegularization(source_model, target_model)()`` = Σ over the target's parameters of 0.5·‖w − w0‖²
* ``BatchSpectralShrinkage(k=1)(feature)`` = Σ of the k smallest squared singular values of ``feature`` (b×d)

Differences from tllib, all deliberate (see docs/weight_penalties.md):

* ``SPRegularization`` copies the source weights (tllib keeps ``param.detach()``, a view that changes if the
  source model is trained or is the target model itself, which silently turns the penalty into 0), and
  matches names after dropping ``module.`` / ``_orig_mod.`` wrapper prefixes (tllib raises a KeyError for a
  DDP-wrapped or compiled target). A target parameter with no source tensor is still a KeyError, as in tllib.
* ``BatchSpectralShrinkage`` raises a ValueError for k ≥ min(b, d) (at k = min(b, d) the loss is just ‖F‖²;
  beyond it tllib's index wraps around and counts the smallest values twice) and for non-2-D input; it
  computes through the float64 Gram matrix (same value and gradient, faster; see :mod:`finereg.feature.bss`).
* Both weight penalties also offer finereg's fused mode, ``reg.add_grad_()`` after ``loss.backward()``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..feature.bss import BSS
from ..weight.l2 import L2, L2SP

__all__ = ["L2Regularization", "SPRegularization", "BatchSpectralShrinkage"]


class L2Regularization(L2):
    r"""tllib's ``L2Regularization(model)``: ``reg()`` = Σ over every parameter of 0.5·‖w‖² (frozen ones too)."""

    def __init__(self, model: nn.Module):
        super().__init__(model, alpha=1.0, skip_frozen=False)
        self.__dict__["model"] = model  # tllib's attribute; not registered, so it stays out of state_dict


class SPRegularization(L2SP):
    r"""tllib's ``SPRegularization(source_model, target_model)``: ``reg()`` = Σ 0.5·‖w − w0‖² over the target's
    parameters, w0 the source parameter of the same name (copied now)."""

    def __init__(self, source_model: nn.Module, target_model: nn.Module):
        if not isinstance(source_model, nn.Module):
            raise TypeError(f"source_model must be an nn.Module, got {type(source_model).__name__}")
        super().__init__(target_model, anchor=source_model, alpha=1.0, unanchored="error", skip_frozen=False)
        self.__dict__["target_model"] = target_model

    @property
    def source_weight(self) -> dict:
        """tllib's ``source_weight``: parameter name → starting-point tensor."""
        return {n: self.anchor(n) for n in self.anchored_names}


class BatchSpectralShrinkage(BSS):
    r"""tllib's ``BatchSpectralShrinkage(k=1)``: ``bss(feature)`` = Σ of the k smallest σ² of ``feature`` (b×d)."""

    def __init__(self, k: int = 1):
        super().__init__(k=k)

    def forward(self, feature: Tensor) -> Tensor:  # tllib's argument name
        return super().forward(feature)
