"""``tllib.regularization.delta``: L2, L2-SP, DELTA's behavioral regularizers and the layer getter.

Same constructor signatures, call conventions and return values as tllib's:

* ``L2Regularization(model)()`` = Σ over all parameters of 0.5·‖w‖²
* ``SPRegularization(source_model, target_model)()`` = Σ over the target's parameters of 0.5·‖w − w0‖²
* ``BehavioralRegularization()(layer_outputs_source, layer_outputs_target)`` = Σ_layers 0.5·‖FM_t − FM_s‖²
* ``AttentionBehavioralRegularization(channel_attention)(...)``: per layer (b, c, h, w),
  0.5·Σ_{b,c} c·attn[c]·‖FM_t − FM_s‖²_{over h·w} / (h·w)
* ``IntermediateLayerGetter(model, return_layers, keep_output=True)(x)`` = (OrderedDict name → output, output)

plus ``calculate_channel_attention``, the procedure of tllib's DELTA script, as a function. A star import gives
every public name tllib's module gives (it has no ``__all__``): also ``torch``, ``nn``, ``functools``,
``OrderedDict`` and ``get_attribute``, which tllib's ``delta.py`` script uses after ``from ... import *``.
The computations are finereg's (:mod:`finereg.weight.l2`, :mod:`finereg.feature.delta`,
:mod:`finereg.feature.attention`); the differences from tllib are listed in docs/feature_penalties.md and
docs/weight_penalties.md.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..._checks import FineregTypeError
from ...feature.attention import attention_from_importance, channel_importance
from ...feature.capture import FeatureCapture
from ...feature.delta import AttentionBehavioralPenalty, behavioral_penalty
from ...weight.l2 import L2, L2SP

__all__ = [
    "torch",
    "nn",
    "functools",
    "OrderedDict",
    "L2Regularization",
    "SPRegularization",
    "BehavioralRegularization",
    "AttentionBehavioralRegularization",
    "get_attribute",
    "IntermediateLayerGetter",
    "calculate_channel_attention",
]


def get_attribute(obj: Any, attr: str, *args: Any) -> Any:
    """tllib's ``get_attribute(obj, "a.b.c"[, default])``: ``getattr`` along a dotted path (the default, if
    given, is returned for a missing attribute at any step)."""
    return functools.reduce(lambda o, a: getattr(o, a, *args), [obj, *attr.split(".")])


class L2Regularization(L2):
    r"""tllib's ``L2Regularization(model)``: ``reg()`` = Σ over every parameter of 0.5·‖w‖² (frozen ones too)."""

    def __init__(self, model: nn.Module):
        super().__init__(model, factor=1.0, skip_frozen=False)
        self.__dict__["model"] = model  # tllib's attribute; not registered, so it stays out of state_dict


class SPRegularization(L2SP):
    r"""tllib's ``SPRegularization(source_model, target_model)``: ``reg()`` = Σ 0.5·‖w − w0‖² over the target's
    parameters, w0 the source parameter of the same name (copied now)."""

    def __init__(self, source_model: nn.Module, target_model: nn.Module):
        if not isinstance(source_model, nn.Module):
            raise FineregTypeError(f"source_model must be an nn.Module, got {type(source_model).__name__}")
        super().__init__(target_model, anchor=source_model, alpha=1.0, unanchored="error", skip_frozen=False)
        self.__dict__["target_model"] = target_model

    @property
    def source_weight(self) -> dict:
        """tllib's ``source_weight``: parameter name → starting-point tensor."""
        return {n: self.anchor(n) for n in self.anchored_names}


class BehavioralRegularization(nn.Module):
    """tllib's ``BehavioralRegularization()``: Σ_layers ½‖FM_t − FM_s.detach()‖².

    ``forward(layer_outputs_source, layer_outputs_target)`` takes the OrderedDicts of two
    :class:`IntermediateLayerGetter` calls. tllib pairs the layers by position; here by name, and different layer
    names or shapes raise a ValueError instead of giving a wrong number.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, layer_outputs_source: Any, layer_outputs_target: Any) -> Tensor:
        return behavioral_penalty(layer_outputs_source, layer_outputs_target)


class AttentionBehavioralRegularization(AttentionBehavioralPenalty):
    """tllib's ``AttentionBehavioralRegularization(channel_attention)``.

    Per layer i with features (b, c, h, w): ½·Σ_{b,c} c·attn[i][c]·‖FM_t − FM_s.detach()‖²_{over h·w} / (h·w).
    ``channel_attention`` is a list with one vector per layer, in the order of the layers (tllib's convention).
    Features of shape (b, d) and (b, tokens, d) are accepted too (see :mod:`finereg.feature.delta`).
    """

    def __init__(self, channel_attention: Sequence[Tensor]) -> None:
        super().__init__(list(channel_attention))

    @property
    def channel_attention(self) -> list[Tensor]:
        return self.attention

    def forward(self, layer_outputs_source: Any, layer_outputs_target: Any) -> Tensor:
        return super().forward(layer_outputs_source, layer_outputs_target)


class IntermediateLayerGetter:
    """tllib's ``IntermediateLayerGetter(model, return_layers, keep_output=True)``.

    ``getter(*args, **kwargs)`` runs ``model`` and returns ``(OrderedDict name -> output, model output or None)``.
    Like tllib it leaves no hook on the model between calls (hooks are added for the call and removed after; for
    persistent hooks use :class:`finereg.feature.capture.FeatureCapture`). Differences: the OrderedDict follows the
    order of ``return_layers`` as tllib documents (tllib's code fills it in execution order, which differs when
    ``return_layers`` is not listed in execution order), and an unknown name raises at construction, listing close
    matches (an AttributeError, as tllib's).
    """

    def __init__(self, model: nn.Module, return_layers: Iterable[str], keep_output: bool = True) -> None:
        self._model = model
        self.return_layers = [return_layers] if isinstance(return_layers, str) else list(return_layers)
        self.keep_output = keep_output
        try:  # check the names now (tllib fails at the first call)
            FeatureCapture(model, list(dict.fromkeys(self.return_layers))).close()
        except KeyError as e:
            raise AttributeError(str(e)) from None

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[OrderedDict[str, Any], Any]:
        with FeatureCapture(self._model, list(dict.fromkeys(self.return_layers))) as capture:
            output = self._model(*args, **kwargs)
            features = capture.outputs
        return features, (output if self.keep_output else None)


def calculate_channel_attention(
    model: nn.Module, layers: Sequence[str], batches: Iterable, criterion: Callable[[Any, Any], Tensor] | None = None
) -> list[Tensor]:
    """DELTA's channel attention by the procedure of tllib's script (``calculate_channel_attention`` in
    ``examples/.../delta.py``), computed batched; one float32 vector per layer, in the order of ``layers``.

    ``model`` is the attention classifier, already trained and used in the state it is given: tllib's script calls
    ``model.eval()`` first, and so must the caller (training mode raises an error: BatchNorm batch statistics would
    mix the batched ablations). ``batches`` is any iterable of ``(inputs, labels)`` (all of it is used: tllib's
    script stops after ``--attention-iteration-limit`` batches); ``criterion`` defaults to cross-entropy. For every
    batch and every output channel j of each layer the loss increase of ``weight[j] = 0`` is averaged over batches,
    standardized per layer (population std) and ``softmax(w / 5)``. Returned in float32 on the model's device, as
    tllib's script returns it. :func:`finereg.feature.attention.channel_attention` has the options (Taylor estimate,
    chunk size, strategy).
    """
    importance = channel_importance(model, layers, batches, criterion)
    attention = attention_from_importance(list(importance.values()))
    device = next((p.device for p in model.parameters()), None)
    return [a.float().to(device) if device is not None else a.float() for a in attention]
