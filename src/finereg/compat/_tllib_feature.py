"""tllib-compatible names for finereg's feature regularizers (re-exported by finereg.compat.tllib).

``tllib.regularization.delta``'s ``BehavioralRegularization``, ``AttentionBehavioralRegularization`` and
``IntermediateLayerGetter`` with their signatures, call conventions and return values, plus ``channel_attention``,
the procedure that tllib has only inside its DELTA script, as a function.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from ..feature.attention import attention_from_importance, channel_importance
from ..feature.capture import FeatureCapture
from ..feature.delta import AttentionBehavioralPenalty, behavioral_penalty

__all__ = [
    "BehavioralRegularization",
    "AttentionBehavioralRegularization",
    "IntermediateLayerGetter",
    "channel_attention",
]


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


def channel_attention(
    model: nn.Module, layers: Sequence[str], batches: Iterable, criterion: Callable[[Any, Any], Tensor] | None = None
) -> list[Tensor]:
    """DELTA's channel attention by tllib's procedure, computed batched; one float32 vector per layer.

    ``model`` is used in the state it is given: tllib's script calls ``model.eval()`` first, and so must the caller
    (training mode raises a ValueError: BatchNorm batch statistics would mix the batched ablations). ``batches`` is
    any iterable of ``(inputs, labels)`` (all of it is used: tllib's script stops after 10 batches); ``criterion``
    defaults to cross-entropy. For every batch and every output channel j of each layer the loss increase of
    ``weight[j] = 0`` is averaged over batches; per layer standardized (population std), ``softmax(w / 5)``.
    Returned in float32 on the model's device, as tllib's script returns it. See
    :func:`finereg.feature.attention.channel_attention` for the options (Taylor estimate, chunk size, strategy).
    """
    importance = channel_importance(model, layers, batches, criterion)
    attention = attention_from_importance(list(importance.values()))
    device = next((p.device for p in model.parameters()), None)
    return [a.float().to(device) if device is not None else a.float() for a in attention]
