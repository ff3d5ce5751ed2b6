"""Pilot of the real-backbone protocol's budget: ERM fine-tuning of the packaged ImageNet EfficientNet-Lite0 on the
mnist5k target set, timed per run, with validation, test and shifted-test accuracy (4500 images evaluated per run).

Not the engine (``finereg fit`` / ``bench`` will run the protocol): a measurement that says how many steps, what
resolution and what caching fit the budget, and whether the task separates the sampling rates. Each run:
``create_model("efficientnet_lite0", pretrained=True)`` with a new 10-class head; optionally the stem and blocks
0..k frozen (BatchNorm in eval mode) and their outputs computed once per image for the whole grid
(``--cache-through k``, −1 = none);
SGD (momentum 0.9, nesterov, weight decay 5e-4), lr ``--lr`` for the backbone and 10× for the new head, cosine
schedule over ``--steps`` steps of batch 32 drawn from the training subset; BatchNorm of the trained part in
training mode (``--bn-eval`` freezes it); ``channels_last`` throughout (3× faster convolution backward on CPU).
One thread per run, as the engine's bench runs one job per core.

    python benchmarks/pilot_real_protocol.py [--size 32] [--steps 60] [--cache-through 2] [--rates 15 100]
        [--seeds 0] [--target mnist5k]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import finereg
from finereg.train.data import derive_seed
from finereg.train.imagenet_task import split_target_set, to_backbone_input
from finereg.train.prefix import split_prefix
from finereg.train.shift import shifted


def prefix_features(source: nn.Module, k: int, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The frozen prefix's output (the engine's :func:`split_prefix`: eval mode, no grad) for every image, in
    chunks."""
    frozen = split_prefix(copy.deepcopy(source), f"blocks.{k}")
    with torch.no_grad():
        return torch.cat([frozen(x[i : i + batch].contiguous()) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * float((pred == y).float().mean())


def run(source, splits, sets, feats, rate, seed, args) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(derive_seed(seed, 17))
    backbone = copy.deepcopy(source)
    backbone.reset_classifier(0)
    k = args.cache_through
    if k >= 0:
        split_prefix(backbone, f"blocks.{k}")  # what remains of the backbone trains on the prefix's outputs
    trunk = backbone
    model = nn.Sequential(trunk, nn.Linear(1280, 10)).to(memory_format=torch.channels_last)
    t_setup = time.perf_counter() - t0
    idx = splits.train_indices(rate, seed)
    pos = {int(i): j for j, i in enumerate(splits.pool.tolist())}  # pool index → row of the 'pool' tensors
    rows = torch.tensor([pos[int(i)] for i in idx])
    x_train, y_train = feats["pool"][rows], sets["pool"][1][rows]
    params = [
        {"params": [p for p in trunk.parameters() if p.requires_grad], "lr": args.lr},
        {"params": model[1].parameters(), "lr": 10 * args.lr},
    ]
    opt = torch.optim.SGD(params, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(derive_seed(seed, rate))
    n = len(rows)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(args.steps * 32 // n + 2)])
    t1 = time.perf_counter()
    for step in range(args.steps):
        model.train()
        if args.bn_eval:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        b = order[step * 32 : (step + 1) * 32]
        loss = F.cross_entropy(model(x_train[b]), y_train[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    res = {name: accuracy(model, feats[name], sets[name][1]) for name in ("val", "test", "shift")}
    t_eval = time.perf_counter() - t2
    res.update(rate=rate, seed=seed, train=n, setup_s=t_setup, train_s=t_train, eval_s=t_eval)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="mnist5k")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--cache-through", type=int, default=2, help="freeze and cache stem + blocks 0..k (-1: none)")
    ap.add_argument("--bn-eval", action="store_true")
    ap.add_argument("--rates", type=float, nargs="+", default=[15, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = split_target_set(args.target)
    d = splits.data
    sets = {
        "pool": (to_backbone_input(d.images[splits.pool], args.size), d.labels[splits.pool]),
        "val": (to_backbone_input(d.images[splits.val], args.size), d.labels[splits.val]),
        "test": (to_backbone_input(d.images[splits.test], args.size), d.labels[splits.test]),
        "shift": ((shifted(d.images[splits.test], args.size) - 0.5) / 0.5, d.labels[splits.test]),
    }
    sets["shift"] = (sets["shift"][0].expand(-1, 3, -1, -1), sets["shift"][1])
    source = finereg.create_model("efficientnet_lite0", pretrained=True)
    t0 = time.perf_counter()
    k = args.cache_through  # the frozen prefix is the same for every run: its outputs are computed once
    feats = {n: prefix_features(source, k, x) if k >= 0 else x for n, (x, _) in sets.items()}
    feats = {n: f.contiguous(memory_format=torch.channels_last) for n, f in feats.items()}
    print(f"prefix outputs of {sum(len(x) for x, _ in sets.values())} images cached in {time.perf_counter() - t0:.1f}s")
    print(
        f"pilot: {args.target} at {args.size}px, {args.steps} steps of 32, lr {args.lr:g}, cache through "
        f"blocks.{args.cache_through}, BN {'eval' if args.bn_eval else 'train'}, {args.threads} thread(s)"
    )
    print(
        f"{'rate':>5s} {'seed':>4s} {'train':>5s} {'val':>6s} {'test':>6s} {'shift':>6s} {'setup s':>8s} "
        f"{'train s':>8s} {'eval s':>7s}"
    )
    for rate in args.rates:
        for seed in args.seeds:
            r = run(source, splits, sets, feats, rate, seed, args)
            print(
                f"{rate:5g} {seed:4d} {r['train']:5d} {r['val']:6.1f} {r['test']:6.1f} {r['shift']:6.1f} "
                f"{r['setup_s']:8.1f} {r['train_s']:8.1f} {r['eval_s']:7.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
