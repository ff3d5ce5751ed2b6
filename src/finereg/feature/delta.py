"""DELTA: behavioral (feature-map) penalties, channel attention, and the attention classifier.

DELTA (Li et al., "DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional Networks",
ICLR 2019) keeps the target network's feature maps FM_j(w, x) close to those of the pretrained source network
FM_j(w0, x) on the same inputs, optionally weighting each channel by how much the source classifier needs it.

Penalties (tllib's values, its ½ factor and c/(h·w) scaling included):

    behavioral            Ω = Σ_layers ½ ‖FM_t − FM_s‖²
    attention-behavioral  Ω = Σ_layers ½ · (c / S) · Σ_{n, ch} a[ch] · ‖FM_t[n, ch] − FM_s[n, ch]‖²_over S

with c channels and S spatial positions per channel. The source features are always detached.

Feature layouts (``channel_dim="auto"``):

    (b, c, *spatial)  ndim ≥ 4: channels are dim 1, S = h·w·…  (convolutional feature maps; tllib's case)
    (b, tokens, d)    ndim = 3: channels are the last dim (d), S = tokens  (transformer hidden states)
    (b, d)            ndim = 2: every feature is a channel, S = 1

Pass ``channel_dim=1`` for (b, c, L) maps of 1-D convolutions.

Channel attention (DELTA §3.3 / tllib's ``calculate_channel_attention``): for each selected layer and output
channel j, the loss increase when channel j is removed (its filter set to zero, ``weight[j] = 0``), averaged over
batches; per layer the increases are standardized (population std) and ``softmax(w / 5)`` gives the attention.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._utils import get_submodule, name_list, strip_prefixes, unknown_name_error, unwrap

__all__ = [
    "behavioral_penalty",
    "attention_behavioral_penalty",
    "BehavioralPenalty",
    "AttentionBehavioralPenalty",
    "channel_importance",
    "attention_from_importance",
    "channel_attention",
    "train_attention_classifier",
]

ChannelDim = Literal["auto"] | int
Features = Mapping[str, Tensor] | Sequence[Tensor]
Criterion = Callable[[Any, Any], Tensor]


# ----------------------------------------------------------------------------------------------------------------
# penalties
# ----------------------------------------------------------------------------------------------------------------
def _feature_pairs(source: Features, target: Features) -> list[tuple[str | int, Tensor, Tensor]]:
    """``(key, source, target)`` per layer; the same layers (by name or by position) and shapes, or a clear error."""
    if isinstance(source, Mapping) != isinstance(target, Mapping):
        raise TypeError(
            "source and target features must both be mappings layer name -> tensor (e.g. the "
            "OrderedDicts of FeatureCapture.outputs) or both sequences of tensors; got "
            f"{type(source).__name__} and {type(target).__name__}"
        )
    if isinstance(source, Mapping):
        s_keys, t_keys = list(source), list(target)
        if set(s_keys) != set(t_keys):
            raise ValueError(
                f"source and target features come from different layers: only in source "
                f"{[k for k in s_keys if k not in target]}, only in target "
                f"{[k for k in t_keys if k not in source]}; capture the same layer names on both models"
            )
        pairs = [(k, source[k], target[k]) for k in t_keys]
    elif isinstance(source, Sequence) and not isinstance(source, (str, Tensor)):
        if len(source) != len(target):
            raise ValueError(f"source has {len(source)} feature tensors and target {len(target)}; they must match")
        pairs = list(zip(range(len(target)), source, target))
    else:
        raise TypeError(
            f"features must be a mapping name -> tensor or a sequence of tensors, got {type(source).__name__}"
        )
    if not pairs:
        raise ValueError(
            "no features given: did the capture hooks run (is the model forward called before the "
            "penalty, on a capture that is not closed)?"
        )
    for key, s, t in pairs:
        if not isinstance(s, Tensor) or not isinstance(t, Tensor):
            raise TypeError(
                f"layer {key!r}: features must be tensors, got {type(s).__name__} and "
                f"{type(t).__name__} (use a selector on the capture for tuple outputs)"
            )
        if s.shape != t.shape:
            raise ValueError(
                f"layer {key!r}: source features have shape {tuple(s.shape)} but target features "
                f"{tuple(t.shape)}; they must be computed on the same inputs by the same architecture"
            )
    return pairs


def _channel_dim(fm: Tensor, channel_dim: ChannelDim, key: str | int) -> int:
    if fm.dim() < 2:
        raise ValueError(
            f"layer {key!r}: features of shape {tuple(fm.shape)} have no batch and channel dimension; "
            f"expected (b, d), (b, tokens, d) or (b, c, *spatial)"
        )
    if channel_dim == "auto":
        return 2 if fm.dim() == 3 else 1
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be 'auto' or an int, got {channel_dim!r}")
    if not -fm.dim() <= channel_dim < fm.dim() or channel_dim % fm.dim() == 0:
        raise ValueError(
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
        diff = t - s.detach()
        value = 0.5 * torch.sum(diff * diff)
        total = value if total is None else total + value
    return total


def attention_behavioral_penalty(
    source: Features,
    target: Features,
    attention: Mapping[str, Tensor] | Sequence[Tensor],
    channel_dim: ChannelDim = "auto",
) -> Tensor:
    """DELTA's attention-weighted penalty, tllib's value: Σ_layers ½·(c/S)·Σ_{n,ch} a[ch]·‖FM_t[n,ch] − FM_s[n,ch]‖².

    ``attention`` gives one vector of c weights per layer: by name (a mapping, as :func:`channel_attention` returns)
    or by position. See the module docstring for the (b, d) / (b, tokens, d) / (b, c, *spatial) conventions.
    """
    pairs = _feature_pairs(source, target)
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
            raise ValueError(f"{len(attention)} attention vectors for {len(pairs)} feature layers; give one per layer")
        weights = list(attention)
    total = None
    for (key, s, t), a in zip(pairs, weights):
        cdim = _channel_dim(t, channel_dim, key)
        c = t.shape[cdim]
        a = torch.as_tensor(a)
        if a.dim() != 1 or a.numel() != c:
            hint = " ((b, tokens, d) features use the last dim; set channel_dim to change)" if t.dim() == 3 else ""
            raise ValueError(
                f"layer {key!r}: attention has shape {tuple(a.shape)} but the features "
                f"{tuple(t.shape)} have {c} channels along dim {cdim}{hint}"
            )
        diff = t - s.detach()
        spatial = diff.numel() // (diff.shape[0] * c)
        other = tuple(d for d in range(diff.dim()) if d != cdim)
        per_channel = torch.sum(diff * diff, dim=other)  # Σ over batch and positions, shape (c,)
        value = (0.5 * c / spatial) * torch.dot(per_channel, a.to(per_channel))
        total = value if total is None else total + value
    return total


def _check_attention(attention: Tensor, where: str) -> Tensor:
    a = torch.as_tensor(attention)
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(
            f"{where}: attention must be a non-empty 1-D tensor of per-channel weights, got shape {tuple(a.shape)}"
        )
    if not torch.is_floating_point(a):
        a = a.to(torch.get_default_dtype())
    if not torch.isfinite(a).all():
        raise ValueError(
            f"{where}: attention has NaN or inf values (tllib's standardization gives NaN when all "
            f"channels have the same loss increase; finereg's gives uniform weights)"
        )
    return a.detach().clone()


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
            raise TypeError(
                f"attention must be a mapping layer name -> tensor or a sequence of tensors, "
                f"got {type(attention).__name__}"
            )
        if not vectors:
            raise ValueError("attention is empty: give one per-channel weight vector per regularized layer")
        if channel_dim != "auto" and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
            raise TypeError(f"channel_dim must be 'auto' or an int, got {channel_dim!r}")
        self.channel_dim = channel_dim
        for i, v in enumerate(vectors):
            where = f"layer {self.layer_names[i]!r}" if self.layer_names else f"attention[{i}]"
            self.register_buffer(f"attention_{i}", _check_attention(v, where))

    @property
    def attention(self) -> list[Tensor]:
        n = len(self.layer_names) if self.layer_names is not None else len(self._buffers)
        return [getattr(self, f"attention_{i}") for i in range(n)]

    def forward(self, source: Features, target: Features) -> Tensor:
        att = self.attention
        if self.layer_names is not None:
            att = dict(zip(self.layer_names, att))
        return attention_behavioral_penalty(source, target, att, self.channel_dim)

    def extra_repr(self) -> str:
        layers = self.layer_names if self.layer_names is not None else f"{len(self._buffers)} layers (by position)"
        return f"layers={layers}, channel_dim={self.channel_dim!r}"


# ----------------------------------------------------------------------------------------------------------------
# channel attention
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str  # as the user wrote it (keys of the results)
    target: str  # without wrapper prefixes (the module path in the unwrapped model / traced graph)
    module: nn.Module
    channels: int
    channel_dim: int  # dimension of the layer's output that holds the channels (1 for conv, -1 for linear)

    def fill(self, like: Tensor) -> Tensor:
        """What channel j becomes when ``weight[j] = 0``: ``bias[j]`` (0 without bias), shape (channels,)."""
        bias = getattr(self.module, "bias", None)
        if bias is None:
            return torch.zeros(self.channels, dtype=like.dtype, device=like.device)
        return bias.detach().to(like.dtype)


def _resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> list[_Layer]:
    names = name_list(
        layers,
        "layer names",
        "the convolution / linear layers whose channels to weigh, e.g. ['layer3.0.conv1', 'layer4.1.conv2']",
    )
    out = []
    for name in names:
        m = get_submodule(model, name)
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            out.append(_Layer(name, strip_prefixes(name), m, m.out_channels, 1))
        elif isinstance(m, nn.Linear):
            out.append(_Layer(name, strip_prefixes(name), m, m.out_features, -1))
        else:
            raise TypeError(
                f"layer {name!r} is a {type(m).__name__}: channel attention removes output channel j "
                f"by setting weight[j] = 0, which needs a layer with output channels (Conv1d/2d/3d "
                f"with out_channels, or Linear with out_features)"
            )
    return out


def _ablated(blocks: Tensor, layer: _Layer, idx: Tensor) -> Tensor:
    """``blocks`` (1 or k, b, *out) → (k, b, *out): block i with channel ``idx[i]`` replaced by its ablated value
    (``bias[j]`` or 0, what ``weight[j] = 0`` gives); index −1 ablates nothing."""
    cdim = 1 + layer.channel_dim % (blocks.dim() - 1)
    if blocks.shape[cdim] != layer.channels:
        raise RuntimeError(
            f"layer {layer.name!r}: its output has shape {tuple(blocks.shape[1:])}, expected "
            f"{layer.channels} channels along dim {cdim - 1}"
        )
    shape = [1] * blocks.dim()
    shape[cdim] = layer.channels
    mask_shape = [idx.numel(), *shape[1:]]
    mask = (torch.arange(layer.channels, device=blocks.device) == idx.to(blocks.device)[:, None]).view(mask_shape)
    return torch.where(mask, layer.fill(blocks).view(shape), blocks)


def _ablate(y: Tensor, layer: _Layer, idx: Tensor) -> Tensor:
    """The layer output ``y`` (b, *out) → (k·b, *out), block i ablating channel ``idx[i]`` (split strategy)."""
    return _ablated(y.unsqueeze(0), layer, idx).flatten(0, 1)


def _ablate_blocks(out: Tensor, layer: _Layer, idx: Tensor, b: int) -> Tensor:
    """The layer output of the repeated batch, k blocks of b samples → the same with the ablations (hook strategy)."""
    k = idx.numel()
    if out.dim() < 2 or out.shape[0] != k * b:
        raise RuntimeError(
            f"layer {layer.name!r}: expected its output to have {k}·{b} samples along dim 0 when "
            f"the input batch is repeated {k} times, got shape {tuple(out.shape)}"
        )
    return _ablated(out.view(k, b, *out.shape[1:]), layer, idx).reshape(out.shape)


def _call(model: Callable, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any) -> int:
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise TypeError(
            f"the inputs of a batch must be a tensor or a tuple/list/dict of tensors with a batch "
            f"dimension, got {type(inputs).__name__}"
        )
    return leaves[0].shape[0]


def _repeat(value: Any, k: int, b: int) -> Any:
    """Tensors with b samples along dim 0 → k copies stacked along dim 0 (a fresh tensor even for k = 1)."""

    def rep(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b:
            return t.repeat(k, *([1] * (t.dim() - 1)))
        return t

    return tree_map(rep, value)


class _LossFns:
    """The criterion on one batch (tllib's loss) and on k blocks of b samples at once (one loss per block)."""

    def __init__(self, criterion: Criterion | None) -> None:
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be a callable (outputs, labels) -> scalar loss, got {criterion!r}")
        self.criterion = criterion if criterion is not None else _cross_entropy
        self._vmap_ok = True

    def __call__(self, outputs: Any, labels: Any) -> Tensor:
        loss = self.criterion(outputs, labels)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"criterion must return a scalar loss tensor (mean over the batch, as "
                f"nn.CrossEntropyLoss()), got {type(loss).__name__} "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else loss!r}"
            )
        return loss.reshape(())

    def blocks(self, outputs: Any, labels: Any, k: int, b: int) -> Tensor:
        leaves, spec = tree_flatten(outputs)
        for t in leaves:
            if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != k * b):
                raise RuntimeError(
                    f"the model output has shape {tuple(t.shape)} when {k} ablations of {b} samples "
                    f"are batched; expected {k * b} samples along dim 0"
                )
        split = tree_unflatten([t.view(k, b, *t.shape[1:]) if isinstance(t, Tensor) else t for t in leaves], spec)
        if self._vmap_ok:
            try:
                return torch.func.vmap(lambda o: self(o, labels))(split).reshape(k)
            except Exception:  # a criterion vmap cannot batch: one call per block below (documented)
                self._vmap_ok = False
        blocks = [tree_map(lambda t, i=i: t[i] if isinstance(t, Tensor) else t, split) for i in range(k)]
        return torch.stack([self(o, labels) for o in blocks])


def _cross_entropy(outputs: Any, labels: Tensor) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the default criterion (cross-entropy) needs the model to return a logits tensor, got "
            f"{type(outputs).__name__}; pass criterion=... that takes the model's output"
        )
    return F.cross_entropy(outputs, labels)


class _CannotSplit(Exception):
    pass


class _LeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps the ablated layers as single ``call_module`` nodes."""

    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)


class _Split:
    """The traced model cut at one layer: ``prefix(x)`` → values that the rest needs (the layer output among them),
    ``suffix(*values)`` → model output. Values computed before the layer and used after it (a residual identity
    branch) come out of the prefix and are repeated along the batch for the ablations."""

    def __init__(self, gm: torch.fx.GraphModule, layer: _Layer) -> None:
        graph = gm.graph
        hits = [n for n in graph.nodes if n.op == "call_module" and n.target == layer.target]
        if len(hits) != 1:
            raise _CannotSplit(f"the traced graph calls layer {layer.name!r} {len(hits)} times")
        node = hits[0]
        after = _descendants([node])
        output = next(n for n in graph.nodes if n.op == "output")
        if output not in after:
            raise _CannotSplit(f"the model output does not depend on layer {layer.name!r}")
        batched = _descendants([n for n in graph.nodes if n.op == "placeholder"], include_roots=True)
        order = list(graph.nodes)
        boundary = [n for n in order if n not in after and any(u in after for u in n.users)]
        prefix, env = torch.fx.Graph(), {}
        for n in order:
            if n not in after:
                env[n] = prefix.node_copy(n, lambda a: env[a])
        prefix.output(tuple(env[n] for n in boundary))
        suffix, env2 = torch.fx.Graph(), {}
        for i, n in enumerate(boundary):
            env2[n] = suffix.placeholder(f"boundary_{i}")
        for n in order:
            if n in after:
                env2[n] = suffix.node_copy(n, lambda a: env2[a])
        self.prefix = torch.fx.GraphModule(gm, prefix)
        self.prefix.graph.eliminate_dead_code()
        self.prefix.recompile()
        self.suffix = torch.fx.GraphModule(gm, suffix)
        self.layer_index = boundary.index(node)
        self.batched = [n in batched for n in boundary]


def _descendants(roots: list[torch.fx.Node], include_roots: bool = False) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set(roots) if include_roots else set()
    stack = list(roots)
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _check_eval(model: nn.Module) -> None:
    training = [n or "<model>" for n, m in unwrap(model).named_modules() if m.training]
    if training:
        raise ValueError(
            f"channel attention needs the model in eval mode, as tllib runs it (model.eval()): in "
            f"training mode BatchNorm batch statistics and dropout would make the batched channel "
            f"ablations differ from one ablation at a time (and BatchNorm would update its running "
            f"statistics). Modules in training mode: {training[:5]}{' ...' if len(training) > 5 else ''}. "
            f"Call model.eval() first"
        )


def _exact_increase(
    model: nn.Module,
    layers: list[_Layer],
    batches: Iterable,
    loss: _LossFns,
    chunk_size: int | None,
    max_batches: int | None,
    strategy: str,
) -> list[Tensor]:
    _check_eval(model)
    root = unwrap(model)
    splits: dict[str, _Split | None] = {}
    if strategy in ("auto", "split"):
        try:
            gm = torch.fx.GraphModule(root, _LeafTracer(lyr.module for lyr in layers).trace(root))
        except Exception as e:
            if strategy == "split":
                raise RuntimeError(f"strategy='split': torch.fx could not trace the model ({e})") from e
            gm = None
        for lyr in layers:
            try:
                splits[lyr.name] = _Split(gm, lyr) if gm is not None else None
            except _CannotSplit as e:
                if strategy == "split":
                    raise RuntimeError(f"strategy='split': {e}") from None
                splits[lyr.name] = None
    history = [torch.zeros(lyr.channels, dtype=torch.float64) for lyr in layers]
    n_batches = 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs, labels = _unpack(batch, i)
            b = _batch_size(inputs)
            k = chunk_size or max(1, 1024 // b)
            loss0 = loss(_call(model, inputs), labels)
            for li, lyr in enumerate(layers):
                split = splits.get(lyr.name)
                inc = None
                if split is not None:
                    try:
                        inc = _split_losses(split, lyr, inputs, labels, b, k, loss, loss0 if i == 0 else None) - loss0
                    except _CannotSplit as e:
                        if strategy == "split":
                            raise RuntimeError(f"strategy='split': {e}") from None
                        splits[lyr.name] = None
                if inc is None:
                    inc = _hook_losses(model, lyr, inputs, labels, b, k, loss) - loss0
                # tllib's running mean: h_i = (i·h_{i-1} + d_i) / (i + 1), in float64
                history[li] = (i * history[li] + inc.detach().double().cpu()) / (i + 1)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("batches gave no (inputs, labels) pairs")
    return history


def _unpack(batch: Any, i: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {i}: expected an (inputs, labels) pair, got {type(batch).__name__}"
            f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}"
        )
    return batch[0], batch[1]


def _split_losses(
    split: _Split, layer: _Layer, inputs: Any, labels: Any, b: int, k: int, loss: _LossFns, check: Tensor | None = None
) -> Tensor:
    """Loss of every ablation of ``layer`` through the split model. With ``check`` (the unablated loss), the first
    chunk carries one extra block without ablation whose loss must equal it, or the split is rejected."""
    values = _call(split.prefix, inputs)
    for v, batched in zip(values, split.batched):
        if batched and not (isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b):
            raise _CannotSplit(
                f"a value computed before layer {layer.name!r} and used after it depends on the batch "
                f"but is not a tensor with the batch along dim 0 ({type(v).__name__})"
            )
    y = values[split.layer_index]
    losses = torch.empty(layer.channels, dtype=y.dtype, device=y.device)
    for start in range(0, layer.channels, k):
        idx = torch.arange(start, min(start + k, layer.channels), device=y.device)
        if check is not None and start == 0:  # index -1 matches no channel: the unablated model
            idx = torch.cat([idx.new_full((1,), -1), idx])
        kk = idx.numel()
        args = [
            _ablate(y, layer, idx) if j == split.layer_index else (_repeat(v, kk, b) if batched else v)
            for j, (v, batched) in enumerate(zip(values, split.batched))
        ]
        try:
            block_losses = loss.blocks(split.suffix(*args), labels, kk, b)
        except RuntimeError as e:
            if start == 0:
                raise _CannotSplit(f"the split model failed on batched ablations ({e})") from e
            raise
        if check is not None and start == 0:
            if not torch.allclose(block_losses[0], check.to(block_losses), rtol=1e-4, atol=1e-6):
                raise _CannotSplit(
                    f"the split model gives loss {block_losses[0].item()} without ablation, the model {check.item()}"
                )
            block_losses = block_losses[1:]
            kk -= 1
        losses[start : start + kk] = block_losses
    return losses


def _hook_losses(model: nn.Module, layer: _Layer, inputs: Any, labels: Any, b: int, k: int, loss: _LossFns) -> Tensor:
    current: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return _ablate_blocks(out, layer, current["idx"], b)

    handle = layer.module.register_forward_hook(hook)
    try:
        chunks = []
        for start in range(0, layer.channels, k):
            idx = torch.arange(start, min(start + k, layer.channels))
            current["idx"] = idx
            out = _call(model, _repeat(inputs, idx.numel(), b))
            chunks.append(loss.blocks(out, labels, idx.numel(), b))
    finally:
        handle.remove()
    return torch.cat(chunks)


def _taylor_increase(
    model: nn.Module, layers: list[_Layer], batches: Iterable, loss: _LossFns, max_batches: int | None
) -> list[Tensor]:
    _check_eval(model)
    captured: dict[str, list[Tensor]] = {lyr.name: [] for lyr in layers}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            if not out.requires_grad:  # frozen parameters: make the output a leaf we can differentiate against
                out = out.detach().requires_grad_()
            captured[name].append(out)
            return out

        return hook

    handles = [lyr.module.register_forward_hook(make_hook(lyr.name)) for lyr in layers]
    history = [torch.zeros(lyr.channels, dtype=torch.float64) for lyr in layers]
    n_batches = 0
    try:
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                inputs, labels = _unpack(batch, i)
                for v in captured.values():
                    v.clear()
                value = loss(_call(model, inputs), labels)
                missing = [lyr.name for lyr in layers if not captured[lyr.name]]
                if missing:
                    raise RuntimeError(f"layers {missing} did not run in the model's forward")
                outs = [o for lyr in layers for o in captured[lyr.name]]
                grads = iter(torch.autograd.grad(value, outs, allow_unused=True))
                for li, lyr in enumerate(layers):
                    inc = 0.0
                    for out in captured[lyr.name]:
                        g = next(grads)
                        if g is None:
                            continue
                        cdim = lyr.channel_dim % out.dim()
                        shape = [1] * out.dim()
                        shape[cdim] = lyr.channels
                        other = tuple(d for d in range(out.dim()) if d != cdim)
                        # Δloss_j ≈ Σ ∂L/∂y_j · (ablated_j − y_j) = −Σ ∂L/∂W_j ⊙ W_j
                        inc = inc + torch.sum(g * (lyr.fill(out).view(shape) - out.detach()), dim=other)
                    inc = torch.as_tensor(inc, dtype=torch.float64).expand(lyr.channels)
                    history[li] = (i * history[li] + inc.detach().double().cpu()) / (i + 1)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for v in captured.values():
            v.clear()
    if n_batches == 0:
        raise ValueError("batches gave no (inputs, labels) pairs")
    return history


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
    if method not in ("exact", "taylor"):
        raise ValueError(f"method must be 'exact' or 'taylor', got {method!r}")
    if strategy not in ("auto", "split", "hook"):
        raise ValueError(f"strategy must be 'auto', 'split' or 'hook', got {strategy!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (ablations per forward), got {chunk_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(batches, (Tensor, str)) or not isinstance(batches, Iterable):
        raise TypeError(
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

    Differs from tllib where every channel of a layer has the same loss increase (std 0): tllib divides by zero
    and returns NaN; here the attention is uniform (1/c). Returns the same container type as given.
    """
    if not (
        isinstance(temperature, (int, float))
        and not isinstance(temperature, bool)
        and temperature > 0
        and math.isfinite(temperature)
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")

    def one(w: Tensor) -> Tensor:
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.dim() != 1 or w.numel() == 0:
            raise ValueError(f"importance vectors must be 1-D and non-empty, got shape {tuple(w.shape)}")
        std = w.std(correction=0)
        z = (w - w.mean()) / std if std > 0 else torch.zeros_like(w)
        return torch.softmax(z / temperature, dim=0)

    if isinstance(importance, Mapping):
        return OrderedDict((k, one(v)) for k, v in importance.items())
    return [one(v) for v in importance]


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


def train_attention_classifier(
    model: nn.Module,
    head: str | nn.Module,
    batches: Iterable,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    lr_decay_epochs: float = 6,
    criterion: Criterion | None = None,
) -> list[float]:
    """Train the new ``head`` of ``model`` on frozen pretrained features, as DELTA prescribes for its attention
    classifier; returns the mean loss of each epoch. ``model`` is trained in place.

    Only the head's parameters are trained; every other parameter is frozen (``requires_grad`` off) and every other
    module stays in eval mode (BatchNorm keeps its running statistics: the features are those of the pretrained
    network). Defaults are tllib's DELTA script: 10 epochs, SGD(lr 0.01, momentum 0.9, Nesterov, weight decay 0),
    the learning rate × 0.1 every ``lr_decay_epochs`` = 6 epochs, decayed exponentially per epoch.
    Parameter flags and train/eval modes are restored afterwards.

    Differs from tllib: its script sets ``classifier.backbone.requires_grad = False``, a plain attribute that freezes
    nothing, so it trains the whole network (the backbone at 0.1·lr) in training mode; DELTA's paper and this
    function train the head alone on frozen features.
    """
    if isinstance(head, str):
        head_module = get_submodule(model, head)
    elif isinstance(head, nn.Module):
        if not any(m is head for m in unwrap(model).modules()):
            raise ValueError("head is not a submodule of model; pass the head module of this model or its name")
        head_module = head
    else:
        raise TypeError(f"head must be a submodule name or an nn.Module, got {type(head).__name__}")
    head_params = list(head_module.parameters())
    if not head_params:
        raise ValueError(f"head {head!r} has no parameters to train")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not lr > 0 or not lr_decay_epochs > 0:
        raise ValueError(f"lr and lr_decay_epochs must be positive, got lr={lr!r}, lr_decay_epochs={lr_decay_epochs!r}")
    if iter(batches) is batches and epochs > 1:
        raise TypeError("batches is a one-pass iterator but epochs > 1; pass a DataLoader or a list")
    loss_fn = _LossFns(criterion)
    root = unwrap(model)
    modes = {m: m.training for m in root.modules()}
    flags = {p: p.requires_grad for p in root.parameters()}
    head_ids = {id(p) for p in head_params}
    try:
        root.eval()
        head_module.train()
        for p in root.parameters():
            p.requires_grad_(id(p) in head_ids)
        opt = torch.optim.SGD(
            head_params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(0.1) / lr_decay_epochs))
        history = []
        for _ in range(epochs):
            total, count = 0.0, 0
            for i, batch in enumerate(batches):
                inputs, labels = _unpack(batch, i)
                loss = loss_fn(_call(model, inputs), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item(), count + 1
            if count == 0:
                raise ValueError("batches gave no (inputs, labels) pairs")
            history.append(total / count)
            sched.step()
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return history
