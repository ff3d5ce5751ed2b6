"""Seed 002: a 1×1 conv 1024 → 10 whose filters are kept pairwise orthogonal, with filters chosen at run time
frozen; and the seed's Keras workaround (one layer per filter, one regularizer over all of them)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg.compat.keras import OrthogonalRegularizer
from finereg.reparam.freeze import freeze
from finereg.weight.groups import WeightGroup
from finereg.weight.orthogonal import Orthogonality, SoftOrthogonality

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n_batches=4, batch=4):
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(batch, 1024, 7, 7, generator=g, dtype=D), torch.randn(batch, 10, 7, 7, generator=g, dtype=D))
        for _ in range(n_batches)
    ]


def test_frozen_filters_stay_and_the_penalty_sees_them():
    conv = nn.Conv2d(1024, 10, 1, bias=False).double()
    penalty = Orthogonality(WeightGroup(conv), factor=0.01)  # over all 10 filters
    frozen = torch.randperm(10)[:4].tolist()  # chosen at run time
    trainable = [i for i in range(10) if i not in frozen]
    start = conv.weight.detach().clone()
    freeze(conv, "weight", frozen)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2, weight_decay=0.1)
    keras_reg = OrthogonalRegularizer(0.01, "columns")  # Keras layout (1, 1, 1024, 10): filters = columns
    for x, y in data():
        opt.zero_grad()
        reg = penalty()
        torch.testing.assert_close(reg, keras_reg(conv.weight, layout="torch"))  # Keras's value, frozen included
        (F.mse_loss(conv(x), y) + reg).backward()
        opt.step()
        assert torch.equal(conv.weight[frozen], start[frozen])
    assert not torch.equal(conv.weight[trainable], start[trainable])

    # the penalty depends on the frozen filters: its gradient on the trainable ones changes with them,
    # and nothing reaches the frozen ones
    original = conv.parametrizations.weight.original

    def penalty_grad():
        original.grad = None
        penalty().backward()
        return original.grad.clone()

    g1 = penalty_grad()
    assert torch.equal(g1[frozen], torch.zeros_like(g1[frozen]))
    with torch.no_grad():
        conv.parametrizations.weight[0].values[frozen] = torch.randn(len(frozen), 1024, 1, 1, dtype=D)
    g2 = penalty_grad()
    assert (g1[trainable] - g2[trainable]).abs().max() > 1e-6


def test_trainable_filters_become_orthogonal_to_the_frozen_ones():
    conv = nn.Conv2d(1024, 10, 1, bias=False).double()
    with torch.no_grad():  # three frozen orthonormal filters
        q, _ = torch.linalg.qr(torch.randn(1024, 3, dtype=D))
        conv.weight[:3] = q.T.reshape(3, 1024, 1, 1)
    freeze(conv, "weight", [0, 1, 2])
    penalty = SoftOrthogonality(WeightGroup(conv))
    opt = torch.optim.SGD(conv.parameters(), lr=0.05, momentum=0.5)
    w = conv.weight.reshape(10, -1)
    cross0 = (w[3:] @ w[:3].T).abs().max().item()
    for _ in range(60):
        opt.zero_grad()
        penalty().backward()
        opt.step()
    w = conv.weight.reshape(10, -1)
    assert torch.equal(w[:3], q.T)
    assert (w[3:] @ w[:3].T).abs().max().item() < 1e-3 * cross0  # pushed away from the frozen filters
    torch.testing.assert_close(w @ w.T, torch.eye(10, dtype=D), atol=1e-4, rtol=0)


def test_penalty_over_three_separate_layers_equals_the_single_layer():
    """The seed's Keras workaround (split layers, whole-layer freezing) and our way (one layer, frozen rows)
    train identically."""
    single = nn.Conv2d(1024, 10, 1, bias=False).double()
    parts = [nn.Conv2d(1024, k, 1, bias=False).double() for k in (3, 3, 4)]
    with torch.no_grad():
        for p, rows in zip(parts, (slice(0, 3), slice(3, 6), slice(6, 10))):
            p.weight.copy_(single.weight[rows])
    split_group = WeightGroup(parts)  # one 10 × 1024 matrix over 3 layers
    pen_split = Orthogonality(split_group, factor=0.1)
    pen_single = Orthogonality(WeightGroup(single), factor=0.1)
    torch.testing.assert_close(pen_split(), pen_single(), rtol=1e-12, atol=0)

    # gradients reach every layer and equal the single layer's rows
    pen_split().backward()
    pen_single().backward()
    for p, rows in zip(parts, split_group.row_slices()):
        torch.testing.assert_close(p.weight.grad, single.weight.grad[rows], rtol=1e-10, atol=1e-14)
    single.weight.grad = None
    for p in parts:
        p.weight.grad = None

    # train: Keras-style split with layer 2 frozen as a whole vs. the single layer with rows 3..5 frozen
    parts[1].requires_grad_(False)
    freeze(single, "weight", [3, 4, 5])
    opt_split = torch.optim.SGD([parts[0].weight, parts[2].weight], lr=0.1, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    for x, y in data(3):
        for loss_fn, opt in (
            (lambda x=x, y=y: F.mse_loss(torch.cat([p(x) for p in parts], 1), y) + pen_split(), opt_split),
            (lambda x=x, y=y: F.mse_loss(single(x), y) + pen_single(), opt_single),
        ):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    torch.testing.assert_close(split_group.matrix(), single.weight.reshape(10, -1), rtol=1e-9, atol=1e-12)


def test_docs_code_blocks_run(capsys):
    """Every ```python block of docs/weight_groups.md runs as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "weight_groups.md"
    if not doc.exists():
        pytest.skip("docs/weight_groups.md not found")
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        exec(compile(code, f"{doc.name}[block {i}]", "exec"), {"__name__": f"doc_block_{i}"})
    assert "hook: row 0 moved by" in capsys.readouterr().out
