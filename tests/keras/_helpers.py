"""Helpers of the Keras front's tests: numpy views, the torch reference, Keras → torch weight layouts."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import finereg

BACKEND = keras.backend.backend()
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="gradients through the torch backend's autograd")


def to_np(x) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(x))


def torch_penalty(name: str, group, factor: float, **kwargs):
    """finereg's torch penalty ``name`` over ``group`` (the one place that spells the torch signature)."""
    return getattr(finereg, name)(group, factor=factor, **kwargs)


def torch_weight(layer) -> torch.Tensor:
    """The torch layout of a Keras layer's kernel (float64): Linear (out, in), Conv (out, in, k...),
    ConvTranspose (in, out, k...), depthwise Conv (in·dm, 1, k...)."""
    k = to_np(layer.kernel).astype(np.float64)
    nd = k.ndim - 2
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        k = k.reshape(*k.shape[:nd], -1)  # (k..., in·dm)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(k, -1, 0)[:, None]))
    return torch.from_numpy(np.ascontiguousarray(np.transpose(k, (nd + 1, nd, *range(nd)))))


def torch_module(layer) -> torch.nn.Module:
    """A torch module of the matching type holding ``layer``'s kernel (float64), for the torch penalties."""
    w = torch_weight(layer)
    if isinstance(layer, keras.layers.Dense):
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    elif isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)):
        cls = torch.nn.ConvTranspose1d if w.dim() == 3 else torch.nn.ConvTranspose2d
        m = cls(w.shape[0], w.shape[1], tuple(w.shape[2:]), bias=False)
    else:
        cls = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[w.dim()]
        depthwise = isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))
        groups = layer.kernel.shape[-2] if depthwise else 1
        m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), groups=groups, bias=False)
    m = m.double()
    with torch.no_grad():
        m.weight.copy_(w)
    return m
