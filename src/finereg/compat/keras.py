"""Keras-compatible regularizers in PyTorch (values equal to Keras 3's, for users porting Keras code).

``OrthogonalRegularizer(factor=0.01, mode="rows")`` is a plain callable like Keras's: call it on a kernel,
get ``factor · ½ Σ_{i≠j} |P_ij| / (k(k−1)/2)`` where P is the cosine matrix of the kernel's rows
(``mode="rows"``) or columns (``mode="columns"``) — the mean |cosine| between distinct rows/columns.

Kernel layouts. Keras stores a Dense kernel as (in, units) and a Conv kernel as (kh, kw, in, filters): the
output units are the *last* axis, so the filters are the **columns** (``mode="columns"`` decorrelates the
filters, ``mode="rows"`` the input-side vectors). PyTorch stores (out, in, kh, kw): call with
``layout="torch"`` to have the weight moved into Keras's layout first.

A kernel of rank ≥ 3 (Conv1D/2D/3D, Keras layout (k..., in, filters)) is reshaped to (∏k · in, filters); a single
row/column (no pairs) gives 0. Where and why this differs from Keras 3: docs/weight_groups.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import FineregError, FineregTypeError
from ..weight.orthogonal import keras_orthogonality

__all__ = ["OrthogonalRegularizer"]


class OrthogonalRegularizer:
    """``keras.regularizers.OrthogonalRegularizer`` for torch tensors.

    Args:
        factor: the regularization factor (non-negative, default 0.01 as in Keras).
        mode: ``"rows"`` or ``"columns"`` of the (Keras-layout) kernel, default ``"rows"`` as in Keras.

    Call: ``reg(kernel, layout="keras")`` → scalar tensor (kernel's dtype). ``layout="torch"`` accepts a
    PyTorch Linear (out, in) or Conv (out, in, k...) weight and permutes it to Keras's (k..., in, out).
    """

    def __init__(self, factor: float = 0.01, mode: Literal["rows", "columns"] = "rows"):
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or math.isinf(factor)
            or math.isnan(factor)
            or factor < 0
        ):
            raise FineregError(
                f"Invalid value for argument factor: expected a non-negative float. Received: factor={factor!r}"
            )
        if mode not in ("rows", "columns"):
            raise FineregError(
                f'Invalid value for argument `mode`. Expected one of {{"rows", "columns"}}. Received: mode={mode!r}'
            )
        self.factor = float(factor)
        self.mode = mode

    @staticmethod
    def to_keras_layout(weight: Tensor) -> Tensor:
        """A PyTorch Linear (out, in) / Conv (out, in, k...) weight in Keras's layout (in, out) / (k..., in, out)."""
        if weight.dim() < 2:
            raise FineregError(f"expected a weight with at least 2 dims, got shape {tuple(weight.shape)}")
        return weight.permute(*range(2, weight.dim()), 1, 0)

    def __call__(self, kernel: Tensor, layout: Literal["keras", "torch"] = "keras") -> Tensor:
        if not isinstance(kernel, Tensor):
            kernel = torch.as_tensor(kernel)
        if not kernel.is_floating_point():
            raise FineregTypeError(f"kernel must be a floating-point tensor, got {kernel.dtype}")
        if layout not in ("keras", "torch"):
            raise FineregError(f"layout must be 'keras' (units last) or 'torch' (units first), got {layout!r}")
        if layout == "torch":
            kernel = self.to_keras_layout(kernel)
        if kernel.dim() < 2:
            raise FineregError(
                f"Inputs to OrthogonalRegularizer must have rank >= 2 (a Dense (in, units) or Conv (k..., in, "
                f"filters) kernel). Received: inputs.shape={tuple(kernel.shape)}"
            )
        matrix = kernel.reshape(-1, kernel.shape[-1])
        return self.factor * keras_orthogonality(matrix, self.mode)

    def get_config(self) -> dict[str, Any]:
        return {"factor": float(self.factor), "mode": self.mode}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OrthogonalRegularizer:
        return cls(**config)

    def __repr__(self) -> str:
        return f"OrthogonalRegularizer(factor={self.factor}, mode={self.mode!r})"
