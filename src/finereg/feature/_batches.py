"""Batches and criteria of the channel-attention procedures: ``(inputs, labels)`` pairs, a model called on the
inputs (a tensor, a tuple of positional arguments or a dict of keyword arguments), and a criterion evaluated on
one batch or on k blocks of b samples at once (one loss per block, batched with ``torch.func.vmap``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._checks import FineregError, FineregTypeError

Criterion = Callable[[Any, Any], Tensor]


def _call(model: Callable, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any) -> int:
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise FineregTypeError(
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
            raise FineregTypeError(f"criterion must be a callable (outputs, labels) -> scalar loss, got {criterion!r}")
        self.criterion = criterion if criterion is not None else _cross_entropy
        self._vmap_ok = True

    def __call__(self, outputs: Any, labels: Any) -> Tensor:
        loss = self.criterion(outputs, labels)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise FineregError(
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
        raise FineregTypeError(
            f"the default criterion (cross-entropy) needs the model to return a logits tensor, got "
            f"{type(outputs).__name__}; pass criterion=... that takes the model's output"
        )
    return F.cross_entropy(outputs, labels)


def _unpack(batch: Any, i: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise FineregTypeError(
            f"batch {i}: expected an (inputs, labels) pair, got {type(batch).__name__}"
            f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}"
        )
    return batch[0], batch[1]


def _batch(batch: Any, i: int) -> tuple[Any, Any, int]:
    """``(inputs, labels, batch size)`` of batch ``i``; an empty batch is an error (the mean loss is undefined)."""
    inputs, labels = _unpack(batch, i)
    b = _batch_size(inputs)
    if b == 0:
        raise FineregError(f"batch {i} has no samples; every batch needs at least one (inputs, labels) sample")
    return inputs, labels, b
