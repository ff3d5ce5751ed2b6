"""Per-tensor projection onto a ball around the anchor: the norms FTP and TPGM share.

Both methods keep each fine-tuned tensor θ inside a ball of radius γ (one learned γ per tensor) around its
pretrained value θ0 (Tian et al., CVPR 2023 (TPGM) and NeurIPS 2023 (FTP))::

    θ ← θ0 + clamp(γ / ‖θ − θ0‖, 0, 1) · (θ − θ0)

with one of two norms:

* ``"l2"``: ‖c‖ = the Euclidean norm of the whole tensor; one ratio per tensor;
* ``"mars"``: the maximum absolute row sum (MARS) norm, used per row: each row c_r of a tensor of shape
  (rows, ...) has its own ‖c_r‖₁ and ratio γ / ‖c_r‖₁ (γ shared by the tensor). A 0-D or 1-D tensor (a bias) is
  one row. This is FTP's ``_mars_norm`` and the ViT version of TPGM.

:class:`RowLayout` maps a list of tensors (one device and dtype) to their rows, so that row norms of all tensors
are one segment reduction (``torch.segment_reduce`` over the concatenated values) and the per-row factors are
broadcastable views for multi-tensor ``_foreach`` ops: no Python loop runs an operation per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_choice

__all__ = ["RowLayout", "NORMS"]

NORMS = ("mars", "l2")


class RowLayout:
    """The rows of ``tensors`` under ``norm`` (see the module docstring).

    ``rows[i]`` rows of ``row_len[i]`` values for tensor i; ``R = sum(rows)`` rows in all.
    """

    def __init__(self, tensors: Sequence[Tensor], norm: str):
        check_choice(norm, "norm", NORMS)
        self.norm = norm
        self.rows = [t.shape[0] if norm == "mars" and t.dim() >= 2 else 1 for t in tensors]
        self.factor_shapes = [(r,) + (1,) * (t.dim() - 1) if t.dim() >= 1 else () for r, t in zip(self.rows, tensors)]
        self.numels = [t.numel() for t in tensors]
        device = tensors[0].device if tensors else None
        self._rows_t = torch.tensor(self.rows, device=device)
        row_len = [n // r if r else 0 for n, r in zip(self.numels, self.rows)]
        self._row_len_t = torch.repeat_interleave(torch.tensor(row_len, device=device), self._rows_t)
        self.total_rows = sum(self.rows)
        self.total = sum(self.numels)

    def norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """The norm of each row, shape (R,)."""
        if self.norm == "l2":
            return torch.stack(torch._foreach_norm(tensors))
        flat = torch.cat([t.reshape(-1) for t in torch._foreach_abs(tensors)])
        return torch.segment_reduce(flat, "sum", lengths=self._row_len_t)

    def tensor_max(self, per_row: Tensor) -> Tensor:
        """The largest row value of each tensor, shape (n,)."""
        if self.norm == "l2":
            return per_row
        return torch.segment_reduce(per_row, "max", lengths=self._rows_t)

    def tensor_min(self, per_row: Tensor) -> Tensor:
        """The smallest row value of each tensor, shape (n,)."""
        if self.norm == "l2":
            return per_row
        return torch.segment_reduce(per_row, "min", lengths=self._rows_t)

    def to_rows(self, per_tensor: Tensor) -> Tensor:
        """A per-tensor value repeated on each of its rows, shape (R,) (differentiable)."""
        if self.norm == "l2":
            return per_tensor
        return torch.repeat_interleave(per_tensor, self._rows_t, output_size=self.total_rows)

    def to_values(self, per_row: Tensor) -> Tensor:
        """A per-row value repeated on each value of its row, shape (total,) (differentiable)."""
        return torch.repeat_interleave(per_row, self._row_len_t, output_size=self.total)

    def factors(self, per_row: Tensor) -> list[Tensor]:
        """Views of ``per_row`` shaped to broadcast against each tensor: (rows, 1, ..., 1)."""
        return [f.view(s) for f, s in zip(torch.split(per_row, self.rows), self.factor_shapes)]

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """The values of all tensors, concatenated (a copy)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflat(self, flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
        """Views of ``flat`` with the given shapes (differentiable)."""
        return [v.view(s) for v, s in zip(torch.split(flat, self.numels), shapes)]
