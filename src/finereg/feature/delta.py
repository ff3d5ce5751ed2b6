"""DELTA's behavioral (feature-map) penalties.

DELTA (Li et al., "DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional Networks",
ICLR 2019) keeps the target network's feature maps FM_j(w, x) close to those of the pretrained source network
FM_j(w0, x) on the same inputs, optionally weighting each channel by how much the source classifier needs it
(the channel attention, :mod:`finereg.feature.attention`).

Penalties (tllib's values, its ½ factor and c/(h·w) scaling included):

    behavioral            Ω = Σ_layers ½ ‖FM_t − FM_s‖²
    attention-behavioral  Ω = Σ_layers ½ · (c / S) · Σ_{n, ch} a[ch] · ‖FM_t[n, ch] − FM_s[n, ch]‖²_over S

with c channels, S spatial positions per channel and a ≥ 0 the attention of each channel. The source features
are always detached. Low-precision (float16 / bfloat16) features are summed in float32, so that a squared
difference that overflows float16 (above 65504) still gives a finite penalty (returned in float32).

Feature layouts (``channel_dim="auto"``):

    (b, c, *spatial)  ndim ≥ 4: channels are dim 1, S = h·w·…  (convolutional feature maps; tllib's case)
    (b, tokens, d)    ndim = 3: channels are the last dim (d), S = tokens  (transformer hidden states)
    (b, d)            ndim = 2: every feature is a channel, S = 1

Pass ``channel_dim=1`` for (b, c, L) maps of 1-D convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError
from .._utils import unknown_name_error

__all__ = [
    "behavioral_penalty",
    "attention_behavioral_penalty",
    "BehavioralPenalty",
    "AttentionBehavioralPenalty",
]

ChannelDim = Literal["auto"] | int
Features = Mapping[str, Tensor] | Sequence[Tensor]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _feature_pairs(source: Features, target: Features) -> list[tuple[str | int, Tensor, Tensor]]:
    """``(key, source, target)`` per layer; the same layers (by name or by position) and shapes, or a clear error."""
    if isinstance(source, Mapping) != isinstance(target, Mapping):
        raise FineregTypeError(
            "source and target features must both be mappings layer name -> tensor (e.g. the "
            "OrderedDicts of FeatureCapture.outputs) or both sequences of tensors; got "
            f"{type(source).__name__} and {type(target).__name__}"
        )
    if isinstance(source, Mapping):
        s_keys, t_keys = list(source), list(target)
        if set(s_keys) != set(t_keys):
            raise FineregError(
                f"source and target features come from different layers: only in source "
                f"{[k for k in s_keys if k not in target]}, only in target "
                f"{[k for k in t_keys if k not in source]}; capture the same layer names on both models"
            )
        pairs = [(k, source[k], target[k]) for k in t_keys]
    elif isinstance(source, Sequence) and not isinstance(source, (str, Tensor)):
        if len(source) != len(target):
            raise FineregError(f"source has {len(source)} feature tensors and target {len(target)}; they must match")
        pairs = list(zip(range(len(target)), source, target))
    else:
        raise FineregTypeError(
            f"features must be a mapping name -> tensor or a sequence of tensors, got {type(source).__name__}"
        )
    if not pairs:
        raise FineregError(
            "no features given: did the capture hooks run (is the model forward called before the "
            "penalty, on a capture that is not closed)?"
        )
    for key, s, t in pairs:
        if not isinstance(s, Tensor) or not isinstance(t, Tensor):
            raise FineregTypeError(
                f"layer {key!r}: features must be tensors, got {type(s).__name__} and "
                f"{type(t).__name__} (use a selector on the capture for tuple outputs)"
            )
        if s.shape != t.shape:
            raise FineregError(
                f"layer {key!r}: source features have shape {tuple(s.shape)} but target features "
                f"{tuple(t.shape)}; they must be computed on the same inputs by the same architecture"
            )
    return pairs


def _channel_dim(fm: Tensor, channel_dim: ChannelDim, key: str | int) -> int:
    if fm.dim() < 2:
        raise FineregError(
            f"layer {key!r}: features of shape {tuple(fm.shape)} have no batch and channel dimension; "
            f"expected (b, d), (b, tokens, d) or (b, c, *spatial)"
        )
    if channel_dim == "auto":
        return 2 if fm.dim() == 3 else 1
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise FineregTypeError(f"channel_dim must be 'auto' or an int, got {channel_dim!r}")
    if not -fm.dim() <= channel_dim < fm.dim() or channel_dim % fm.dim() == 0:
        raise FineregError(
            f"layer {key!r}: channel_dim={channel_dim} is not a non-batch dimension of features "
            f"of shape {tuple(fm.shape)}"
        )
    return channel_dim % fm.dim()


def behavioral_penalty(source: Features, target: Features) -> Tensor:
    """DELTA's behavioral penalty Σ_layers ½‖FM_t − FM_s‖² (source detached), equal to tllib's value and gradients.

    ``source`` and ``target`` map layer names to feature tensors (matched by name), or are sequences (by position).
    """
    total = None
    for _, s, t in _feature_pairs(source, target):
        diff = _diff(s, t)
        value = 0.5 * torch.sum(diff * diff)
        total = value if total is None else total + value
    return total


def _diff(source: Tensor, target: Tensor) -> Tensor:
    """FM_t − FM_s (source detached), in float32 for float16 / bfloat16 features (their squares overflow)."""
    if target.dtype in _LOW_PRECISION or source.dtype in _LOW_PRECISION:
        return target.float() - source.detach().float()
    return target - source.detach()


def attention_behavioral_penalty(
    source: Features,
    target: Features,
    attention: Mapping[str, Tensor] | Sequence[Tensor],
    channel_dim: ChannelDim = "auto",
) -> Tensor:
    """DELTA's attention-weighted penalty, tllib's value: Σ_layers ½·(c/S)·Σ_{n,ch} a[ch]·‖FM_t[n,ch] − FM_s[n,ch]‖².

    ``attention`` gives one vector of c non-negative weights per layer: by name (a mapping, as
    :func:`~finereg.feature.attention.channel_attention` returns) or by position. See the module docstring for the
    (b, d) / (b, tokens, d) / (b, c, *spatial) conventions.
    """
    pairs = _feature_pairs(source, target)
    weights = _weights_of(pairs, attention)
    return _attention_penalty(
        pairs, [_check_attention(a, f"layer {k!r}") for (k, _, _), a in zip(pairs, weights)], channel_dim
    )


def _weights_of(pairs: list, attention: Mapping[str, Tensor] | Sequence[Tensor]) -> list[Tensor]:
    """The attention vector of each feature pair, by layer name or by position."""
    if isinstance(attention, Mapping):
        keys = [k for k, _, _ in pairs]
        missing = [k for k in keys if k not in attention]
        if missing:
            raise unknown_name_error(
                "attention vector for layer",
                str(missing[0]),
                [str(k) for k in attention],
                hint=f"(layers without attention: {missing})",
            )
        weights = [attention[k] for k in keys]
    else:
        if len(attention) != len(pairs):
            raise FineregError(
                f"{len(attention)} attention vectors for {len(pairs)} feature layers; give one per layer"
            )
        weights = list(attention)
    return weights


def _attention_penalty(pairs: list, weights: list[Tensor], channel_dim: ChannelDim) -> Tensor:
    total = None
    for (key, s, t), a in zip(pairs, weights):
        cdim = _channel_dim(t, channel_dim, key)
        c = t.shape[cdim]
        a = torch.as_tensor(a)
        if a.dim() != 1 or a.numel() != c:
            hint = " ((b, tokens, d) features use the last dim; set channel_dim to change)" if t.dim() == 3 else ""
            raise FineregError(
                f"layer {key!r}: attention has shape {tuple(a.shape)} but the features "
                f"{tuple(t.shape)} have {c} channels along dim {cdim}{hint}"
            )
        diff = _diff(s, t)
        spatial = math.prod(t.shape[d] for d in range(t.dim()) if d not in (0, cdim))
        other = tuple(d for d in range(diff.dim()) if d != cdim)
        per_channel = torch.sum(diff * diff, dim=other)  # Σ over batch and positions, shape (c,)
        value = (0.5 * c / spatial) * torch.dot(per_channel, a.to(per_channel))
        total = value if total is None else total + value
    return total


def _check_attention(attention: Tensor, where: str) -> Tensor:
    a = torch.as_tensor(attention)
    if a.dim() != 1 or a.numel() == 0:
        raise FineregError(
            f"{where}: attention must be a non-empty 1-D tensor of per-channel weights, got shape {tuple(a.shape)}"
        )
    if not torch.is_floating_point(a):
        a = a.to(torch.get_default_dtype())
    if not torch.isfinite(a).all():
        raise FineregError(f"{where}: attention has NaN or inf values; recompute it (channel_attention)")
    if (a < 0).any():
        raise FineregError(
            f"{where}: attention has negative weights (min {a.min().item():g}): a negative weight would reward "
            "drifting away from the source features; attention weights are >= 0 (softmax outputs)"
        )
    return a.detach()


class BehavioralPenalty(nn.Module):
    """DELTA's behavioral regularizer Ω = Σ_layers ½‖FM_t − FM_s‖² as a module: ``penalty(source, target)``."""

    def forward(self, source: Features, target: Features) -> Tensor:
        return behavioral_penalty(source, target)


class AttentionBehavioralPenalty(nn.Module):
    """DELTA's attention-weighted behavioral regularizer as a module: ``penalty(source, target)``.

    Ω = Σ_layers ½·(c/S)·Σ_{n,ch} a[ch]·‖FM_t[n,ch] − FM_s[n,ch]‖²  (c channels, S positions per channel).

    Args:
        attention: one vector of per-channel weights per layer, by layer name (mapping, e.g. the result of
            :func:`channel_attention`) or by position (sequence, tllib's convention). Kept as buffers, so they
            follow ``.to(device)`` and live in ``state_dict``.
        channel_dim: ``"auto"`` (module docstring) or the channel dimension of every layer's features.
    """

    def __init__(self, attention: Mapping[str, Tensor] | Sequence[Tensor], channel_dim: ChannelDim = "auto") -> None:
        super().__init__()
        if isinstance(attention, Mapping):
            self.layer_names: list[str] | None = [str(k) for k in attention]
            vectors = list(attention.values())
        elif isinstance(attention, (Sequence, Tensor)) and not isinstance(attention, str):
            self.layer_names = None
            vectors = list(attention)
        else:
            raise FineregTypeError(
                f"attention must be a mapping layer name -> tensor or a sequence of tensors, "
                f"got {type(attention).__name__}"
            )
        if not vectors:
            raise FineregError("attention is empty: give one per-channel weight vector per regularized layer")
        if channel_dim != "auto" and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
            raise FineregTypeError(f"channel_dim must be 'auto' or an int, got {channel_dim!r}")
        self.channel_dim = channel_dim
        for i, v in enumerate(vectors):
            where = f"layer {self.layer_names[i]!r}" if self.layer_names else f"attention[{i}]"
            self.register_buffer(f"attention_{i}", _check_attention(v, where).clone())

    @property
    def attention(self) -> list[Tensor]:
        n = len(self.layer_names) if self.layer_names is not None else len(self._buffers)
        return [getattr(self, f"attention_{i}") for i in range(n)]

    def forward(self, source: Features, target: Features) -> Tensor:
        att = self.attention
        if self.layer_names is not None:
            att = dict(zip(self.layer_names, att))
        pairs = _feature_pairs(source, target)
        return _attention_penalty(pairs, _weights_of(pairs, att), self.channel_dim)  # checked at construction

    def extra_repr(self) -> str:
        layers = self.layer_names if self.layer_names is not None else f"{len(self._buffers)} layers (by position)"
        return f"layers={layers}, channel_dim={self.channel_dim!r}"
