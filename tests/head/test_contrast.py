"""finereg.head._contrast: Bi-Tuning's ordered contrast rows equal the plain construction (concatenate, reorder
the blocks, log_softmax) in value and gradient; gradcheck in float64."""

import pytest
import torch

from finereg.head._contrast import class_order, contrast_log_softmax


def _reference(pos, scores, labels, C, rows=None):
    rows = torch.arange(len(labels)) if rows is None else rows
    S = scores.view(scores.shape[0], C, -1)[rows]  # (b, C, K)
    order = class_order(labels, C)
    blocks = torch.stack([S[i, order[i]] for i in range(len(labels))]).flatten(1)
    return torch.log_softmax(torch.cat([pos[:, None], blocks], 1), 1)


def test_class_order():
    assert class_order(torch.tensor([0, 2, 3]), 4).tolist() == [[0, 1, 2, 3], [2, 0, 1, 3], [3, 0, 1, 2]]


@pytest.mark.parametrize("shared", [False, True])
def test_equals_the_plain_construction(shared):
    g = torch.Generator().manual_seed(0)
    C, K, b = 5, 3, 7
    labels = torch.tensor([4, 0, 2, 2, 1, 4, 0])
    pos = torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True)
    if shared:  # one row per class present (the classifier contrast): no gradient to the scores
        present, rows = torch.unique(labels, return_inverse=True)
        scores = torch.randn(len(present), C * K, generator=g, dtype=torch.float64)
    else:
        rows = None
        scores = torch.randn(b, C * K, generator=g, dtype=torch.float64, requires_grad=True)
    out = contrast_log_softmax(pos, scores, labels, C, rows)
    ref = _reference(pos, scores, labels, C, rows)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = [pos] if shared else [pos, scores]
    ours = torch.autograd.grad((out * weights).sum(), inputs)
    theirs = torch.autograd.grad((ref * weights).sum(), inputs)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 0, 2, 1])
    pos = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(4, 3 * 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, s: contrast_log_softmax(p, s, labels, 3), (pos, scores))


def test_shared_rows_take_no_gradient():
    scores = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(ValueError, match="shared score rows"):
        contrast_log_softmax(torch.zeros(3), scores, torch.tensor([0, 1, 1]), 3, torch.tensor([0, 1, 1]))
