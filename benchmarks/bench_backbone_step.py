"""A training step of the real ImageNet-pretrained EfficientNet-Lite0 on CPU, and what each regularizer adds.

All variants are timed side by side in one run, interleaved round by round in a new random order each round, so
that other load on the machine hits them alike; the minimum over rounds is reported (interference only adds
time), with the median beside it. Batch 32, SGD with momentum; the network is finereg's packaged
``create_model("efficientnet_lite0", pretrained=True)`` (no download) with a new 10-class head, as fine-tuning
on the protocol's target set.

1. steps: images/s of a full training step (forward, backward, SGD) at each resolution, with and without
   ``channels_last``, with BatchNorm in training mode or frozen in eval mode, on ``--threads`` threads (default 1,
   as ``finereg bench`` runs one job per core) and on 2 (or 1);
   and with a frozen, cached prefix (stem + blocks 0..k in eval mode, their output computed once per image:
   only blocks k+1.. train, in training mode, channels_last), which is what caching can save.
2. regularizers, at ``--reg-size`` (channels_last unless ``--reg-contiguous``): the step with each method's extra
   work, as a share of an ERM step timed just before it (median and quartiles of these paired ratios):
   L2 and L2-SP as a loss term, L2-SP fused (``add_grad_`` into ``.grad``), DELTA (second forward of the frozen
   source + feature distance at the ends of stages 1, 2, 4, 6), BSS (k=1 on the 32×1280 features), LwF (the
   source head on the features + KD against recorded predictions: no second forward), KD (against a second
   forward of the frozen source), Co-Tuning (the source head + CE against the relationship), Bi-Tuning (a
   second view through the momentum key encoder, the momentum update of all weights, projector and queues).
3. the same extra work alone (the term's forward and backward, or the fused update, on the tensors a step gives
   it), timed 30 times: precise where the paired full steps cannot resolve a few percent on a loaded machine.

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
from finereg.train.prefix import split_prefix

BATCH, CLASSES = 32, 10
CACHED_PREFIXES = (2, 4)
DELTA_LAYERS = ["backbone.blocks.1", "backbone.blocks.2", "backbone.blocks.4", "backbone.blocks.6"]


class Net(nn.Module):
    """backbone (pooled 1280-d features) → new head; the pretrained classifier kept as source_head."""

    def __init__(self, backbone: nn.Module, source_head: nn.Linear):
        super().__init__()
        self.backbone, self.head, self.source_head = backbone, nn.Linear(1280, CLASSES), source_head

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f), f


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


def measure(variants: dict[str, Callable], rounds: int, steps: int, log=print) -> dict[str, dict[str, float]]:
    """Seconds per step of each variant: ``rounds`` rounds of ``steps`` steps, the variants in a new random order
    each round (other load hits them alike); the minimum over rounds (the cost without interference) and the
    median."""
    import random

    for fn in variants.values():  # warm-up (allocator, kernels)
        fn()
    times: dict[str, list[float]] = {n: [] for n in variants}
    order = list(variants)
    rng = random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                variants[n]()
            times[n].append((time.perf_counter() - t0) / steps)
        log(f"  round {r + 1}/{rounds} done")
    return {n: {"min": min(ts), "median": statistics.median(ts)} for n, ts in times.items()}


def measure_paired(base: Callable, variants: dict[str, Callable], rounds: int, steps: int, log=print) -> dict:
    """Each variant's time as a ratio to the base step timed just before it: ``rounds`` rounds, the variants in a
    new random order each round, ``steps`` steps of the base then of the variant per pair. Load that changes
    slower than a pair cancels in the ratio; the median and the quartiles of the ratios are reported."""
    import random

    base()
    for fn in variants.values():
        fn()
    ratios: dict[str, list[float]] = {n: [] for n in variants}
    base_times: list[float] = []
    order = list(variants)
    rng = random.Random(0)

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    for r in range(rounds):
        rng.shuffle(order)
        for n in order:
            tb = timed(base)
            ratios[n].append(timed(variants[n]) / tb)
            base_times.append(tb)
        log(f"  round {r + 1}/{rounds} done")
    out = {"base_median_s": statistics.median(base_times), "base_min_s": min(base_times)}
    for n, rs in ratios.items():
        q = statistics.quantiles(rs, n=4)
        out[n] = {"median": statistics.median(rs), "q1": q[0], "q3": q[2]}
    return out


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
        other = 2 if threads == 1 else 1
        out[f"{s}px contiguous BN train, {other} thread(s)"] = with_threads(step_fn(net, opt, x, y), other)
        for k in CACHED_PREFIXES:  # frozen, cached prefix: stem + blocks 0..k in eval mode; the rest trains
            net, _ = build(source, channels_last=True)
            frozen = split_prefix(net.backbone, f"blocks.{k}")  # the engine's split: net.backbone is the rest
            opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
            x, y = batch(s, channels_last=True)
            with torch.no_grad():
                cached = frozen(x).contiguous(memory_format=torch.channels_last)

            def fwd(_x, net=net, cached=cached):
                return net(cached)

            out[f"{s}px channels_last, cached prefix through blocks.{k}"] = step_fn(net, opt, x, y, forward=fwd)
    return out


def reg_variants(source, size, channels_last=True):
    out: dict[str, Callable] = {}
    x, y = batch(size, channels_last)
    frozen = copy.deepcopy(source).eval().requires_grad_(False)
    if channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)

    def plain():
        return build(source, channels_last=channels_last)

    net, opt = plain()
    out["ERM"] = step_fn(net, opt, x, y)

    net, opt = plain()
    l2 = finereg.L2(net, factor=0.01, include=["backbone.*", "head.*"])
    out["L2 (loss term)"] = step_fn(net, opt, x, y, extra=lambda *a, r=l2: r())

    net, opt = plain()
    anchor = {f"backbone.{k}": v for k, v in frozen.state_dict().items() if not k.startswith("classifier.")}
    l2sp = finereg.L2SP(net, anchor=anchor, alpha=0.01, beta=0.01, include=["backbone.*", "head.*"])
    out["L2-SP (loss term)"] = step_fn(net, opt, x, y, extra=lambda *a, r=l2sp: r())

    net, opt = plain()
    l2sp_f = finereg.L2SP(net, anchor=anchor, alpha=0.01, beta=0.01, include=["backbone.*", "head.*"])
    out["L2-SP (fused add_grad_)"] = step_fn(net, opt, x, y, after_backward=l2sp_f.add_grad_)

    net, opt = plain()
    src_net = Net(copy.deepcopy(frozen), frozen.classifier).eval().requires_grad_(False)  # the frozen source
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
    kd3 = KnowledgeDistillation(temperature=3.0)
    out["LwF (recorded targets)"] = step_fn(
        net, opt, x, y, extra=lambda x_, y_, lg, f, n=net: 4.0 * kd3(n.source_head(f), recorded)
    )

    net, opt = plain()
    net.source_head.requires_grad_(True)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    kd1 = KnowledgeDistillation(temperature=1.0)

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
    bi = BiTuning(enc, num_classes=CLASSES, K=40, m=0.999, temperature=0.07).train()
    if channels_last:
        bi = bi.to(memory_format=torch.channels_last)
    bopt = torch.optim.SGD([p for p in bi.encoder_q.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    x2, _ = batch(size, channels_last, seed=1)

    def bi_step():
        bopt.zero_grad(set_to_none=True)
        y_q, lz, ly, lc = bi(x, x2, y)
        kl = F.kl_div(lz, lc, reduction="batchmean") + F.kl_div(ly, lc, reduction="batchmean")
        (F.cross_entropy(y_q, y) + kl).backward()
        bopt.step()

    out["Bi-Tuning (2nd view, key encoder)"] = bi_step
    return out


def isolated_extras(source, size, channels_last=True) -> dict[str, Callable]:
    """Each regularizer's extra work alone (its term's forward and backward, or the fused update), on the
    tensors a step would give it: short enough to time precisely beside the step."""
    net, _ = build(source, channels_last=channels_last)
    x, y = batch(size, channels_last)
    frozen = copy.deepcopy(source).eval().requires_grad_(False)
    if channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)
    with torch.no_grad():
        f0 = net.backbone(x)
        recorded = frozen(x)
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    anchor = {f"backbone.{k}": v for k, v in frozen.state_dict().items() if not k.startswith("classifier.")}
    inc = ["backbone.*", "head.*"]
    l2 = finereg.L2(net, factor=0.01, include=inc)
    l2sp = finereg.L2SP(net, anchor=anchor, alpha=0.01, beta=0.01, include=inc)
    bss = finereg.BSS(k=1)
    head = copy.deepcopy(net.source_head).requires_grad_(True)
    kd3, kd1 = KnowledgeDistillation(temperature=3.0), KnowledgeDistillation(temperature=1.0)
    cot = CoTuning(direct_relationship(torch.softmax(recorded, 1), y, CLASSES))
    src_net = Net(copy.deepcopy(frozen), frozen.classifier).eval().requires_grad_(False)
    src_net.backbone.reset_classifier(0)
    cap_s = finereg.FeatureCapture(src_net, DELTA_LAYERS, detach=True)
    with torch.no_grad():
        src_net(x)
    target_maps = {k: v.clone().requires_grad_(True) for k, v in cap_s.outputs.items()}

    def feat():
        return f0.clone().requires_grad_(True)

    def delta():
        with torch.no_grad():
            src_net(x)
        finereg.behavioral_penalty(cap_s.outputs, target_maps).backward()

    def kd():
        with torch.no_grad():
            teacher = frozen(x)
        kd1(head(feat()), teacher).backward()

    return {
        "L2 (loss term)": lambda: l2().backward(),
        "L2-SP (loss term)": lambda: l2sp().backward(),
        "L2-SP (fused add_grad_)": l2sp.add_grad_,
        "DELTA (2nd forward)": delta,
        "BSS": lambda: bss(feat()).backward(),
        "LwF (recorded targets)": lambda: kd3(head(feat()), recorded).backward(),
        "KD (2nd forward)": kd,
        "Co-Tuning": lambda: cot(head(feat()), y).backward(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--reg-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="1: as the engine's bench (one job per core)")
    ap.add_argument("--skip-steps", action="store_true", help="only the regularizer table")
    ap.add_argument("--reg-contiguous", action="store_true", help="regularizers without channels_last")
    ap.add_argument("--reg-rounds", type=int, help="rounds of the regularizer table (default: --rounds)")
    ap.add_argument("--reg-steps", type=int, help="steps per round of the regularizer table (default: --steps)")
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
        print(f"{'variant':52s} {'min s/step':>10s} {'img/s':>7s} {'median':>8s}")
        for n, s in t.items():
            print(f"{n:52s} {s['min']:10.3f} {BATCH / s['min']:7.1f} {s['median']:8.3f}")
    layout = "contiguous" if args.reg_contiguous else "channels_last"
    rounds, steps = args.reg_rounds or args.rounds, args.reg_steps or args.steps
    print(
        f"\n2. regularizers at {args.reg_size}px ({layout}, BatchNorm in training mode), "
        f"{rounds} rounds × {steps} steps"
    )
    variants = reg_variants(source, args.reg_size, not args.reg_contiguous)
    base = variants.pop("ERM")
    t = measure_paired(base, variants, rounds, steps)
    result["regularizers"] = t
    print(f"ERM step: median {t['base_median_s']:.3f} s, min {t['base_min_s']:.3f} s")
    print(f"{'method':36s} {'added (median)':>15s} {'quartiles':>17s}")
    for n in variants:
        r = t[n]
        print(f"{n:36s} {100 * (r['median'] - 1):+14.1f}% {100 * (r['q1'] - 1):+7.1f}% {100 * (r['q3'] - 1):+7.1f}%")
    print(f"\n3. each regularizer's extra work alone at {args.reg_size}px ({layout}), as a share of the ERM step")
    extras = measure(isolated_extras(source, args.reg_size, not args.reg_contiguous), 30, 1, log=lambda m: None)
    step = t["base_median_s"]
    result["isolated"] = extras
    print(f"{'method':36s} {'median ms':>10s} {'min ms':>8s} {'share of step':>14s}")
    for n, e in extras.items():
        print(f"{n:36s} {1e3 * e['median']:10.2f} {1e3 * e['min']:8.2f} {100 * e['median'] / step:13.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
