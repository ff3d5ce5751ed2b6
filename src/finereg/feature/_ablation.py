"""The machinery of exact channel ablation and of its first-order (Taylor) estimate.

Removing output channel j of a layer (tllib: ``weight[j] = 0``) makes the channel equal its bias (0 without
bias). The exact loss increase of every channel is measured batched: k ablations at once, each a block of the
batch dimension.

* split: the model traced with ``torch.fx`` and cut at the layer; the prefix runs once, its output is repeated k
  times with one channel ablated per block, and the suffix runs on the k·b samples. Values computed before the
  layer and used after it (a residual branch) come out of the prefix and are repeated along the batch.
* hook: the whole model on the k-times repeated batch, a forward hook writing each block's ablation.

Taylor: one forward and backward per batch, Δ_j ≈ Σ ∂L/∂y_j · (fill_j − y_j) = −Σ ∂L/∂W_j ⊙ W_j.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError
from .._utils import get_submodule, name_list, strip_prefixes, unwrap
from ._batches import _batch, _call, _LossFns, _repeat


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
            raise FineregTypeError(
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
        if not hits:
            raise FineregError(
                f"layer(s) [{layer.name!r}] did not run in the model's forward (the traced graph never calls it): "
                "channel attention weighs the channels of layers the model uses; check the layer names"
            )
        if len(hits) != 1:
            raise _CannotSplit(f"the traced graph calls layer {layer.name!r} {len(hits)} times")
        node = hits[0]
        after = _descendants([node])
        output = next(n for n in graph.nodes if n.op == "output")
        if output not in after:
            raise FineregError(
                f"the model output does not depend on layer {layer.name!r}: removing its channels changes nothing, "
                "so it has no channel attention; choose layers the model's output uses"
            )
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
        raise FineregError(
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
            inputs, labels, b = _batch(batch, i)
            k = chunk_size or max(1, 1024 // b)
            with _record_calls(layers) as ran:
                loss0 = loss(_call(model, inputs), labels)
            _check_ran(layers, ran, i)
            _check_finite(loss0, i)
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
                _check_finite(inc, i, lyr)
                # tllib's running mean: h_i = (i·h_{i-1} + d_i) / (i + 1), in float64
                history[li] = (i * history[li] + inc.detach().double().cpu()) / (i + 1)
            n_batches += 1
    if n_batches == 0:
        raise FineregError("batches gave no (inputs, labels) pairs")
    return history


@contextlib.contextmanager
def _record_calls(layers: list[_Layer]) -> Iterator[set[str]]:
    """The names of the layers that ran during the block (forward hooks, removed after)."""
    ran: set[str] = set()
    handles = [lyr.module.register_forward_hook(lambda m, a, o, n=lyr.name: ran.add(n)) for lyr in layers]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


def _check_ran(layers: list[_Layer], ran: set[str], i: int) -> None:
    missing = [lyr.name for lyr in layers if lyr.name not in ran]
    if missing:
        raise FineregError(
            f"layer(s) {missing} did not run in the model's forward on batch {i}: channel attention weighs the "
            "channels of layers the model uses; check the layer names (model.named_modules())"
        )


def _check_finite(value: Tensor, i: int, layer: _Layer | None = None) -> None:
    """Fail on the first non-finite loss (or loss increase): the importance would be NaN, and the attention too."""
    bad = ~torch.isfinite(value)
    if not bad.any():
        return
    if layer is None:
        raise FineregError(
            f"the loss on batch {i} is {value.item()}: channel attention needs finite losses; check the inputs, "
            "the labels and the model's outputs on that batch"
        )
    channels = torch.nonzero(bad.reshape(-1)).flatten().tolist()
    raise FineregError(
        f"layer {layer.name!r}: removing channel(s) {channels[:10]}{' ...' if len(channels) > 10 else ''} gives a "
        f"non-finite loss (or loss increase) on batch {i}; channel attention needs finite importances"
    )


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
                inputs, labels, _ = _batch(batch, i)
                for v in captured.values():
                    v.clear()
                value = loss(_call(model, inputs), labels)
                _check_ran(layers, {n for n, v in captured.items() if v}, i)
                _check_finite(value.detach(), i)
                outs = [o for lyr in layers for o in captured[lyr.name]]
                grads = iter(torch.autograd.grad(value, outs, allow_unused=True))
                for li, lyr in enumerate(layers):
                    inc = 0.0
                    used = False
                    for out in captured[lyr.name]:
                        g = next(grads)
                        if g is None:
                            continue
                        used = True
                        cdim = lyr.channel_dim % out.dim()
                        shape = [1] * out.dim()
                        shape[cdim] = lyr.channels
                        other = tuple(d for d in range(out.dim()) if d != cdim)
                        # Δloss_j ≈ Σ ∂L/∂y_j · (ablated_j − y_j) = −Σ ∂L/∂W_j ⊙ W_j
                        inc = inc + torch.sum(g * (lyr.fill(out).view(shape) - out.detach()), dim=other)
                    if not used:
                        raise FineregError(
                            f"the loss does not depend on layer {lyr.name!r}: removing its channels changes nothing, "
                            "so it has no channel attention; choose layers the model's output uses"
                        )
                    inc = torch.as_tensor(inc, dtype=torch.float64).expand(lyr.channels)
                    _check_finite(inc, i, lyr)
                    history[li] = (i * history[li] + inc.detach().double().cpu()) / (i + 1)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for v in captured.values():
            v.clear()
    if n_batches == 0:
        raise FineregError("batches gave no (inputs, labels) pairs")
    return history
