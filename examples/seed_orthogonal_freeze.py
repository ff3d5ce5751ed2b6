"""Seed 002 in PyTorch: a 1×1 conv 1024 → 10 on (7, 7, 1024) inputs whose 10 filters are kept pairwise
orthogonal by one regularizer, with some filters chosen at run time frozen.

In Keras the user had to split the layer into 10 one-filter layers (Keras freezes whole layers only) and
rebuild the regularizer over all of them. Here the layer stays whole: ``freeze`` fixes the chosen filters
exactly, and the penalty keeps seeing all 10 (frozen ones included).

Run:  python examples/seed_orthogonal_freeze.py [--freeze 0,3,7] [--steps 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from finereg.compat.keras import OrthogonalRegularizer
from finereg.reparam.freeze import freeze, frozen_mask
from finereg.weight.groups import WeightGroup
from finereg.weight.orthogonal import Orthogonality, SoftOrthogonality


def max_abs_cos(w: torch.Tensor) -> float:
    u = F.normalize(w.reshape(w.shape[0], -1), dim=1)
    return (u @ u.T - torch.eye(len(u))).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freeze", default=None, help="comma-separated filter indices (default: 3 at random)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    conv = nn.Conv2d(1024, 10, kernel_size=1, bias=False)  # Keras: Conv2D(10, (1, 1)) on (7, 7, 1024)
    group = WeightGroup(conv)  # 10 rows (filters) × 1024
    penalty = Orthogonality(group, factor=0.01)  # Keras-equal, rows = output units
    keras_reg = OrthogonalRegularizer(0.01, mode="columns")  # Keras kernel (1,1,1024,10): filters are columns
    print(f"conv weight {tuple(conv.weight.shape)} -> group matrix {group.shape}")
    print(
        f"orthogonality penalty {penalty().item():.6f}  (Keras OrthogonalRegularizer on the Keras kernel: "
        f"{keras_reg(conv.weight.detach(), layout='torch').item():.6f})"
    )

    frozen = [int(i) for i in args.freeze.split(",")] if args.freeze else sorted(torch.randperm(10)[:3].tolist())
    start = conv.weight.detach().clone()
    freeze(conv, "weight", frozen)
    trainable = [i for i in range(10) if i not in frozen]
    print(f"frozen filters {frozen}: {int(frozen_mask(conv).sum())} of {conv.weight.numel()} weights")

    # a toy regression target; AdamW with weight decay would move 'frozen' filters under a gradient hook
    teacher = torch.randn(10, 1024, 1, 1) / 32
    opt = torch.optim.AdamW(conv.parameters(), lr=3e-3, weight_decay=0.1)
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 1024, 7, 7)  # PyTorch NCHW for Keras's (N, 7, 7, 1024)
        data_loss = F.mse_loss(conv(x), F.conv2d(x, teacher))
        reg = penalty()
        opt.zero_grad()
        (data_loss + reg).backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            w = conv.weight.detach()
            print(
                f"step {step:3d}  data {data_loss.item():.5f}  penalty {reg.item():.6f}  "
                f"max|Δ frozen| {(w[frozen] - start[frozen]).abs().max().item():.1e}  "
                f"max|Δ trainable| {(w[trainable] - start[trainable]).abs().max().item():.1e}  "
                f"max|cos| {max_abs_cos(w):.4f}"
            )
    assert torch.equal(conv.weight[frozen], start[frozen]), "frozen filters moved"

    # the penalty sees the frozen filters: pure soft orthogonality pushes the others away from them
    so = SoftOrthogonality(group)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05, momentum=0.5)
    w = conv.weight.detach().reshape(10, -1)
    u = F.normalize(w, dim=1)
    before = (u[trainable] @ u[frozen].T).abs().max().item()
    for _ in range(100):
        opt.zero_grad()
        so().backward()
        opt.step()
    u = F.normalize(conv.weight.detach().reshape(10, -1), dim=1)
    after = (u[trainable] @ u[frozen].T).abs().max().item()
    print(
        f"soft orthogonality only: max|cos(trainable, frozen)| {before:.4f} -> {after:.2e}; "
        f"frozen still exact: {torch.equal(conv.weight[frozen], start[frozen])}"
    )

    # the seed's Keras workaround, for comparison: one regularizer over three separate layers
    parts = [nn.Conv2d(1024, k, 1, bias=False) for k in (3, 3, 4)]
    split = WeightGroup(parts)  # joined along rows: one 10 × 1024 matrix
    print(f"3 separate layers as one group: {split.shape}, penalty {Orthogonality(split, factor=0.01)().item():.6f}")


if __name__ == "__main__":
    main()
