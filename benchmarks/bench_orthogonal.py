"""Soft orthogonality (‖W Wᵀ − I‖²_F) + its gradient over a ResNet-50's conv weights, grouped per stage.

Side by side in one run:
  naive   — a Python loop over the conv layers of layer1..layer4, each W reshaped to (out, in·k·k), the
            paper's formula with the out × out Gram (what people write by hand);
  small   — the same loop, Gram on the smaller side (‖WᵀW − I_m‖² + (n − m) for tall W);
  finereg — SoftOrthogonality over 4 WeightGroups (one per stage, axis=None): smaller-side Grams, all
            matrices of one shape evaluated in one batched matmul, analytic gradient (one matmul).
Checks that all give the same total and the same gradients (float64), prints times and ratios, and exits
non-zero on a mismatch.

    python benchmarks/bench_orthogonal.py [--dtype float32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

from finereg.weight.groups import WeightGroup
from finereg.weight.orthogonal import SoftOrthogonality

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def stage_convs(model):
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n.split(".")[0] in STAGES]


def naive_total(convs):
    total = 0
    for c in convs:
        w = c.weight.reshape(c.weight.shape[0], -1)
        total = total + (w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)).square().sum()
    return total


def small_side_total(convs):
    total = 0
    for c in convs:
        w = c.weight.reshape(c.weight.shape[0], -1)
        n, m = w.shape
        g = w @ w.T if n <= m else w.T @ w
        total = total + (g - torch.eye(g.shape[0], dtype=w.dtype)).square().sum() + max(n - m, 0)
    return total


def build(dtype):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None).to(dtype)
    groups = [WeightGroup(f"{s}.*", model, axis=None) for s in STAGES]
    return model, stage_convs(model), SoftOrthogonality(groups)


def value_and_grads(fn, params):
    for p in params:
        p.grad = None
    v = fn()
    v.backward()
    return v.detach(), [p.grad.clone() for p in params]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best and median reported)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; 0 = torch's default)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. same result (float64)
    model, convs, penalty = build(torch.float64)
    params = [c.weight for c in convs]
    print(
        f"ResNet-50 stages: {len(convs)} conv weights in {len(penalty.groups)} groups, "
        f"{sum(p.numel() for p in params) / 1e6:.1f} M weights; "
        f"{len({tuple(m.shape) for g in penalty.groups for m in g.matrices()})} distinct matrix shapes"
    )
    ref_v, ref_g = value_and_grads(lambda: naive_total(convs), params)
    ok = True
    for name, fn in (("small", lambda: small_side_total(convs)), ("finereg", penalty)):
        v, g = value_and_grads(fn, params)
        err_v = abs(v - ref_v).item() / ref_v.abs().item()
        err_g = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g, ref_g))
        good = err_v < 1e-9 and err_g < 1e-9
        ok &= good
        print(
            f"check {name:8s} vs naive (float64): value {v.item():.6f} vs {ref_v.item():.6f}, "
            f"rel err value {err_v:.1e}, grads {err_g:.1e} -> {'OK' if good else 'MISMATCH'}"
        )
    if not ok:
        return 1

    # 2. timings: variants interleaved round by round (fair under a drifting machine load), best and median
    dtype = getattr(torch, args.dtype)
    model, convs, penalty = build(dtype)
    params = [c.weight for c in convs]
    env = {
        "value_and_grads": value_and_grads,
        "params": params,
        "naive_total": naive_total,
        "small_side_total": small_side_total,
        "convs": convs,
        "penalty": penalty,
    }
    stmts = {
        "naive": "value_and_grads(lambda: naive_total(convs), params)",
        "small": "value_and_grads(lambda: small_side_total(convs), params)",
        "finereg": "value_and_grads(penalty, params)",
    }
    timers = {k: Timer(v, globals=env, num_threads=torch.get_num_threads()) for k, v in stmts.items()}
    for t in timers.values():
        t.timeit(1)  # warm-up
    runs: dict[str, list[float]] = {k: [] for k in stmts}
    for _ in range(args.repeats):
        for k, t in timers.items():
            runs[k].append(t.timeit(1).median)
    best = {k: min(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(
            f"{k:8s} value+grad: best {best[k] * 1e3:8.1f} ms, median {statistics.median(v) * 1e3:8.1f} ms "
            f"({args.repeats} runs, {args.dtype}, {torch.get_num_threads()} thread(s))"
        )
    print(
        f"speed-up finereg vs naive loop: {best['naive'] / best['finereg']:.2f}x best-of-{args.repeats} "
        f"(median {statistics.median(runs['naive']) / statistics.median(runs['finereg']):.2f}x); "
        f"smaller-side loop alone: {best['naive'] / best['small']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
