"""A training step of the real ImageNet-pretrained EfficientNet-Lite0 on CPU, and what each regularizer adds.

All variants are timed side by side in one run, interleaved round by round (the median of the rounds), so that
other load on the machine hits them alike. Batch 32, SGD with momentum; the network is finereg's packaged
``create_model("efficientnet_lite0", pretrained=True)`` (no download) with a new 10-class head, as fine-tuning
on the protocol's target set.

1. steps: images/s of a full training step (forward, backward, SGD) at each resolution, with and without
   ``channels_last``, with BatchNorm in training mode or frozen in eval mode, on 1 thread and on all threads;
   and with a frozen, cached prefix (stem + blocks 0..k in eval mode, their output computed once per image:
   only blocks k+1.. train), which is what caching can save.
2. regularizers, at ``--reg-size``: the step with each method's extra work, as a share of the ERM step:
   L2 and L2-SP as a loss term, L2-SP fused (``add_grad_`` into ``.grad``), DELTA (second forward of the frozen
   source + feature distance at the ends of stages 1, 2, 4, 6), BSS (k=1 on the 32×1280 features), LwF (the
   source head on the features + KD against recorded predictions: no second forward), KD (against a second
   forward of the frozen source), Co-Tuning (the source head + CE against the relationship), Bi-Tuning (a
   second view through the momentum key encoder, the momentum update of all weights, projector and queues).

    python benchmarks/bench_backbone_step.py [--sizes 32 48 64] [--reg-size 32] [--rounds 5] [--threads 2]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import finereg
from finereg.head import CoTuning, KnowledgeDistillation, direct_relationship
from finereg.head.bi_tuning import BiTuning, BiTuningClassifier

BATCH, CLASSES = 32, 10
DELTA_LAYERS = ["backbone.blocks.1", "backbone.blocks.2", "backbone.blocks.4", "backbone.blocks.6"]


class Net(nn.Module):
    """backbone (pooled 1280-d features) → new head; the pretrained classifier kept as source_head."""

    def __init__(self, backbone: nn.Module, source_head: nn.Linear):
        super().__init__()
        self.backbone, self.head, self.source_head = backbone, nn.Linear(1280, CLASSES), source_head

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f), f


class Tail(nn.Module):
    """blocks k+1.. of a backbone and its head convolution / pooling: the trainable part after a cached prefix."""

    def __init__(self, backbone: nn.Module, k: int):
        super().__init__()
        self.blocks = backbone.blocks[k + 1 :]
        self.conv_head, self.bn2, self.global_pool = backbone.conv_head, backbone.bn2, backbone.global_pool

    def forward(self, x):
        return self.global_pool(self.bn2(self.conv_head(self.blocks(x))))


def prefix(backbone: nn.Module, k: int) -> Callable:
    def run(x):
        with torch.no_grad():
            return backbone.blocks[: k + 1](backbone.bn1(backbone.conv_stem(x)))

    return run


def build(source: nn.Module, *, channels_last=False, bn_eval=False):
    backbone = copy.deepcopy(source)
    source_head = backbone.classifier
    backbone.reset_classifier(0)
    net = Net(backbone, source_head)
    source_head.requires_grad_(False)
    net.train()
    if bn_eval:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    return net, opt


def batch(size: int, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, (torch.arange(BATCH) % CLASSES)[torch.randperm(BATCH, generator=g)]  # every class present


def step_fn(net, opt, x, y, extra=None, after_backward=None, forward=None):
    """One training step; ``extra(x, y, logits, features)`` returns the regularizer's loss term."""

    def step():
        opt.zero_grad(set_to_none=True)
        logits, f = forward(x) if forward else net(x)
        loss = F.cross_entropy(logits, y)
        if extra is not None:
            loss = loss + extra(x, y, logits, f)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()

    return step


def with_threads(fn: Callable, n: int) -> Callable:
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(old)

    return run


def measure(variants: dict[str, Callable], rounds: int, steps: int, log=print) -> dict[str, float]:
    """Median seconds per step of each variant, interleaved over ``rounds`` rounds of ``steps`` steps."""
    for fn in variants.values():  # warm-up (allocator, kernels)
        fn()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(rounds):
        for n, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[n].append((time.perf_counter() - t0) / steps)
        log(f"  round {r + 1}/{rounds} done")
    return {n: statistics.median(ts) for n, ts in times.items()}


def step_variants(source, sizes, threads):
    out: dict[str, Callable] = {}
    for s in sizes:
        for cl in (False, True):
            for bn_eval in (False, True):
                net, opt = build(source, channels_last=cl, bn_eval=bn_eval)
                x, y = batch(s, cl)
                name = f"{s}px {'channels_last' if cl else 'contiguous'} BN {'eval' if bn_eval else 'train'}"
                out[name] = step_fn(net, opt, x, y)
        net, opt = build(source)
        x, y = batch(s)
        out[f"{s}px contiguous BN train, 1 thread"] = with_threads(step_fn(net, opt, x, y), 1)
        for k in (1, 2, 3):  # frozen, cached prefix: stem + blocks 0..k in eval mode
            net, opt = build(source, bn_eval=True)
            tail = Tail(net.backbone, k)
            for p in net.backbone.parameters():
                p.requires_grad_(False)
            for p in tail.parameters():
                p.requires_grad_(True)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            tail.train()
            for m in tail.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            x, y = batch(s)
            cached = prefix(net.backbone, k)(x)

            def fwd(_x, tail=tail, net=net, cached=cached):
                f = tail(cached)
                return net.head(f), f

            out[f"{s}px cached prefix through blocks.{k} (BN eval)"] = step_fn(net, opt, x, y, forward=fwd)
    return out


def reg_variants(source, size):
    out: dict[str, Callable] = {}
    x, y = batch(size)
    frozen = copy.deepcopy(source).eval().requires_grad_(False)

    def plain():
        return build(source)

    net, opt = plain()
    out["ERM"] = step_fn(net, opt, x, y)

    net, opt = plain()
    l2 = finereg.L2(net, alpha=0.01, include=["backbone.*", "head.*"])
    out["L2 (loss term)"] = step_fn(net, opt, x, y, extra=lambda *a, r=l2: r())

    net, opt = plain()
    anchor = {f"backbone.{k}": v for k, v in frozen.state_dict().items() if not k.startswith("classifier.")}
    l2sp = finereg.L2SP(net, anchor=anchor, alpha=0.01, beta=0.01, include=["backbone.*", "head.*"])
    out["L2-SP (loss term)"] = step_fn(net, opt, x, y, extra=lambda *a, r=l2sp: r())

    net, opt = plain()
    l2sp_f = finereg.L2SP(net, anchor=anchor, alpha=0.01, beta=0.01, include=["backbone.*", "head.*"])
    out["L2-SP (fused add_grad_)"] = step_fn(net, opt, x, y, after_backward=l2sp_f.add_grad_)

    net, opt = plain()
    src_net = Net(copy.deepcopy(frozen), frozen.classifier).eval().requires_grad_(False)
    src_net.backbone.reset_classifier(0)
    cap_t = finereg.FeatureCapture(net, DELTA_LAYERS)
    cap_s = finereg.FeatureCapture(src_net, DELTA_LAYERS, detach=True)

    def delta(x_, y_, logits, f, src_net=src_net, cap_s=cap_s, cap_t=cap_t):
        with torch.no_grad():
            src_net(x_)
        return 0.01 * finereg.behavioral_penalty(cap_s.outputs, cap_t.outputs)

    out["DELTA (2nd forward)"] = step_fn(net, opt, x, y, extra=delta)

    net, opt = plain()
    bss = finereg.BSS(k=1)
    out["BSS"] = step_fn(net, opt, x, y, extra=lambda x_, y_, lg, f, b=bss: 0.001 * b(f))

    net, opt = plain()
    net.source_head.requires_grad_(True)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    with torch.no_grad():
        recorded = frozen(x)  # LwF records the pretrained predictions once, before training
    kd3 = KnowledgeDistillation(T=3.0)
    out["LwF (recorded targets)"] = step_fn(
        net, opt, x, y, extra=lambda x_, y_, lg, f, n=net: 4.0 * kd3(n.source_head(f), recorded)
    )

    net, opt = plain()
    net.source_head.requires_grad_(True)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    kd1 = KnowledgeDistillation(T=1.0)

    def kd(x_, y_, lg, f, n=net):
        with torch.no_grad():
            teacher = frozen(x_)
        return kd1(n.source_head(f), teacher)

    out["KD (2nd forward)"] = step_fn(net, opt, x, y, extra=kd)

    net, opt = plain()
    net.source_head.requires_grad_(True)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    rel = direct_relationship(torch.softmax(recorded, 1), y, CLASSES)
    cot = CoTuning(rel)
    out["Co-Tuning"] = step_fn(net, opt, x, y, extra=lambda x_, y_, lg, f, n=net, c=cot: 2.3 * c(n.source_head(f), y_))

    backbone = copy.deepcopy(source)
    backbone.reset_classifier(0)
    enc = BiTuningClassifier(backbone, CLASSES, 128, features_dim=1280)
    bi = BiTuning(enc, num_classes=CLASSES, K=40, m=0.999, T=0.07).train()
    bopt = torch.optim.SGD([p for p in bi.encoder_q.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    x2, _ = batch(size, seed=1)

    def bi_step():
        bopt.zero_grad(set_to_none=True)
        y_q, lz, ly, lc = bi(x, x2, y)
        kl = F.kl_div(lz, lc, reduction="batchmean") + F.kl_div(ly, lc, reduction="batchmean")
        (F.cross_entropy(y_q, y) + kl).backward()
        bopt.step()

    out["Bi-Tuning (2nd view, key encoder)"] = bi_step
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--reg-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-steps", action="store_true", help="only the regularizer table")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = finereg.create_model("efficientnet_lite0", pretrained=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; EfficientNet-Lite0 (packaged ImageNet "
        f"weights), batch {BATCH}, {args.rounds} interleaved rounds × {args.steps} steps, median"
    )
    result: dict[str, dict[str, float]] = {}
    if not args.skip_steps:
        print("\n1. training step")
        t = measure(step_variants(source, args.sizes, args.threads), args.rounds, args.steps)
        result["steps"] = t
        print(f"{'variant':58s} {'s/step':>8s} {'img/s':>8s}")
        for n, s in t.items():
            print(f"{n:58s} {s:8.3f} {BATCH / s:8.1f}")
    print(f"\n2. regularizers at {args.reg_size}px (contiguous, BatchNorm in training mode)")
    t = measure(reg_variants(source, args.reg_size), args.rounds, args.steps)
    result["regularizers"] = t
    base = t["ERM"]
    print(f"{'method':40s} {'s/step':>8s} {'added':>8s}")
    for n, s in t.items():
        print(f"{n:40s} {s:8.3f} {100 * (s - base) / base:+7.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
