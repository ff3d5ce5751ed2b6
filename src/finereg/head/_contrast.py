"""Bi-Tuning's contrast rows: each sample's scores against the C·K queue, its own class's K keys first.

For sample i of class c_i with positive score p_i and queue scores S (rows r_i of an (R, C, K) tensor: one row
per sample, or one per class present in the batch), the row is

    x_i = [p_i, S[r_i, c_i, :], S[r_i, 0, :], …, S[r_i, c_i − 1, :], S[r_i, c_i + 1, :], …, S[r_i, C − 1, :]]

(1 + C·K values: the positive, its class's keys, then every other class's keys in class order: tllib's layout)
and :func:`contrast_log_softmax` returns log_softmax(x_i) for every i, shape (b, 1 + C·K).

One autograd function does it with one copy of K-value blocks into the row order above (rows shared by the
samples of a class are read from one row of scores) and one in-place log-softmax. Its backward is the
log-softmax backward, dx = g − softmax(x)·Σg, with the block order undone by one more copy; where the queue
scores need no gradient (the classifier contrast: the head rows and the queue are detached) only the positives'
gradient is formed, O(b) instead of O(b·C·K).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_order", "contrast_log_softmax"]


def class_order(labels: Tensor, num_classes: int) -> Tensor:
    """(b, C) index: row i = [c_i, 0, 1, ..., c_i − 1, c_i + 1, ..., C − 1] (positives first, then negatives)."""
    j = torch.arange(num_classes, device=labels.device)[None, :]
    c = labels[:, None]
    return torch.where(j == 0, c, torch.where(j <= c, j - 1, j))


def _inverse_order(labels: Tensor, num_classes: int) -> Tensor:
    """(b, C): where natural block n of row i lands in the order of :func:`class_order`."""
    j = torch.arange(num_classes, device=labels.device)[None, :]
    c = labels[:, None]
    return torch.where(j == c, 0, torch.where(j < c, j + 1, j))


class _ContrastLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos: Tensor, scores: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        b, C = pos.shape[0], num_classes
        R, K = scores.shape[0], scores.shape[1] // C
        blocks = torch.index_select(scores.view(R * C, K), 0, (rows[:, None] * C + class_order(labels, C)).flatten())
        out = torch.cat([pos[:, None], blocks.view(b, C * K)], dim=1)
        torch.log_softmax(out, dim=1, out=out)  # one fused pass per row, in place
        ctx.save_for_backward(out, labels)
        ctx.num_classes, ctx.scores_grad = C, ctx.needs_input_grad[1]
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        out, labels = ctx.saved_tensors
        if not ctx.scores_grad:  # only the positives: dx_0 = g_0 − softmax(x)_0 · Σ_j g_j
            return g[:, 0] - out[:, 0].exp() * g.sum(1), None, None, None, None
        b, C = out.shape[0], ctx.num_classes
        dx = torch._log_softmax_backward_data(g.contiguous(), out, 1, out.dtype)
        body = dx[:, 1:].contiguous().view(b * C, -1)
        natural = (torch.arange(b, device=g.device)[:, None] * C + _inverse_order(labels, C)).flatten()
        return dx[:, 0], torch.index_select(body, 0, natural).view(b, -1), None, None, None


def contrast_log_softmax(
    pos: Tensor, scores: Tensor, labels: Tensor, num_classes: int, rows: Tensor | None = None
) -> Tensor:
    """log_softmax of each sample's contrast row (module docstring), shape (b, 1 + C·K).

    Args:
        pos: (b,) the positive scores.
        scores: (R, C·K) queue scores, class-major (class c's K keys at columns c·K … c·K + K − 1), contiguous.
        labels: (b,) int64 classes of the samples.
        num_classes: C.
        rows: (b,) the row of ``scores`` of each sample (default: row i for sample i, R = b). Rows shared by
            several samples (one per class present) take no gradient.
    """
    if rows is None:
        rows = torch.arange(pos.shape[0], device=pos.device)
    elif scores.requires_grad:
        raise ValueError("shared score rows (rows=...) take no gradient; pass one row per sample")
    return _ContrastLogSoftmax.apply(pos, scores.contiguous(), rows, labels, num_classes)
