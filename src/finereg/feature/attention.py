"""DELTA's channel attention: how much the source classifier needs each channel of a layer.

For each selected layer and output channel j, the loss increase when channel j is removed (its filter set to zero,
``weight[j] = 0``: the channel becomes its bias), averaged over batches (tllib's running mean
h_i = (i·h_{i−1} + Δ_i) / (i + 1)); per layer the increases w are standardized with the population std and

    a = softmax(((w − mean(w)) / std(w)) / temperature)          temperature = 5 (DELTA §3.3, tllib's script)

Shapes: a layer with c output channels (Conv{1,2,3}d ``out_channels``, Linear ``out_features``) gets a (c,)
float64 importance vector and a (c,) attention vector summing to 1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_choice, check_int, check_number
from .._utils import unwrap
from ._ablation import _exact_increase, _resolve_layers, _taylor_increase
from ._batches import Criterion, _LossFns

__all__ = ["channel_importance", "attention_from_importance", "channel_attention"]


def channel_importance(
    model: nn.Module,
    layers: str | Iterable[str],
    batches: Iterable,
    criterion: Criterion | None = None,
    *,
    method: Literal["exact", "taylor"] = "exact",
    chunk_size: int | None = None,
    max_batches: int | None = None,
    strategy: Literal["auto", "split", "hook"] = "auto",
) -> OrderedDict[str, Tensor]:
    """Per-channel loss increase when each output channel of ``layers`` is removed (DELTA's raw channel weights).

    For each batch (inputs, labels) of ``batches`` (inputs: a tensor, a tuple of positional arguments or a dict of
    keyword arguments) and each layer, channel j is removed as tllib does it, by ``weight[j] = 0``: the channel
    becomes ``bias[j]`` (0 without bias). The loss increase L(removed j) − L is averaged over batches
    (tllib's running mean). The model is used in the state given.

    ``method="exact"`` gives tllib's numbers, batched: the network before the layer runs once per batch and chunks of
    ``chunk_size`` ablations (default ⌊1024 / batch size⌋) go through the rest with the ablation folded into the
    batch dimension. ``strategy``:

    * ``"split"``: trace with ``torch.fx`` and cut the graph at the layer; values from before the layer that the rest
      uses (a residual branch) are computed once and repeated along the batch;
    * ``"hook"``: the whole model on the repeated batch, a forward hook writes each block's ablation (needs no
      tracing; also right when the layer is called several times);
    * ``"auto"``: split, falling back to hook for a layer where tracing or splitting fails.

    The model must be in eval mode for both methods (tllib calls ``model.eval()``): with BatchNorm in training mode
    the ablations would share batch statistics (and the running statistics would change). The loss of each
    ablation is the criterion on that ablation's block (batched with ``torch.func.vmap``; a criterion vmap cannot
    handle is called once per block).

    ``method="taylor"``: first-order estimate from one forward and backward per batch,
    Δ_j ≈ Σ_{n,pos} ∂L/∂y_j · (fill_j − y_j) = −Σ ∂L/∂W_j ⊙ W_j (y_j the channel's output, fill_j = bias_j or 0),
    summed over every call of the layer.

    Returns ``layer name → float64 vector`` (on the CPU) in the order of ``layers``.
    """
    model = unwrap(model)  # DDP / compile wrappers: evaluate the module itself (no gradient sync, hooks always run)
    resolved = _resolve_layers(model, layers)
    check_choice(method, "method", ("exact", "taylor"))
    check_choice(strategy, "strategy", ("auto", "split", "hook"))
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size (ablations per forward)", low=1)
    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches", low=1)
    if isinstance(batches, (Tensor, str)) or not isinstance(batches, Iterable):
        raise FineregTypeError(
            f"batches must be an iterable of (inputs, labels) pairs (a DataLoader, a list), "
            f"got {type(batches).__name__}"
        )
    loss = _LossFns(criterion)
    if method == "exact":
        values = _exact_increase(model, resolved, batches, loss, chunk_size, max_batches, strategy)
    else:
        values = _taylor_increase(model, resolved, batches, loss, max_batches)
    return OrderedDict((lyr.name, v) for lyr, v in zip(resolved, values))


def attention_from_importance(importance: Mapping[str, Tensor] | Sequence[Tensor], temperature: float = 5.0) -> Any:
    """Per layer: standardize with the population std, then ``softmax(w / temperature)`` (tllib: temperature 5).

    Where every channel of a layer has the same loss increase (std 0) the attention is uniform (1/c); a non-finite
    importance is an error. Returns the same container type as given.
    """
    temperature = check_number(temperature, "temperature", low=0, low_open=True)

    def one(key: Any, w: Tensor) -> Tensor:
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.dim() != 1 or w.numel() == 0:
            raise FineregError(f"importance vectors must be 1-D and non-empty, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise FineregError(
                f"the importance of layer {key!r} has NaN or inf values: its attention would be meaningless; "
                "recompute it on batches where the model's loss is finite"
            )
        std = w.std(correction=0)
        z = (w - w.mean()) / std if std > 0 else torch.zeros_like(w)
        return torch.softmax(z / temperature, dim=0)

    if isinstance(importance, Mapping):
        return OrderedDict((k, one(k, v)) for k, v in importance.items())
    return [one(i, v) for i, v in enumerate(importance)]


def channel_attention(
    model: nn.Module,
    layers: str | Iterable[str],
    batches: Iterable,
    criterion: Criterion | None = None,
    *,
    method: Literal["exact", "taylor"] = "exact",
    temperature: float = 5.0,
    chunk_size: int | None = None,
    max_batches: int | None = None,
    strategy: Literal["auto", "split", "hook"] = "auto",
) -> OrderedDict[str, Tensor]:
    """DELTA's channel attention: :func:`channel_importance` then :func:`attention_from_importance`.

    Returns ``layer name → attention`` (each sums to 1) in the dtype of the model's parameters, on their device,
    ready for :class:`AttentionBehavioralPenalty`. tllib measures it with an attention classifier (the pretrained
    backbone with a new head trained on the target data, :func:`train_attention_classifier`) in eval mode, on at most
    10 batches of 32; ``max_batches`` caps the batches here.
    """
    imp = channel_importance(
        model,
        layers,
        batches,
        criterion,
        method=method,
        chunk_size=chunk_size,
        max_batches=max_batches,
        strategy=strategy,
    )
    att = attention_from_importance(imp, temperature)
    ref = next(unwrap(model).parameters(), None)
    if ref is not None and ref.is_floating_point():
        att = OrderedDict((k, v.to(device=ref.device, dtype=ref.dtype)) for k, v in att.items())
    return att
