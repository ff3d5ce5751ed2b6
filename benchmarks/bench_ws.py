"""Weight standardization speed, side by side in one run, with a check that all give the same result.

Training (forward + backward) through a stack of ResNet-50 bottleneck convolutions (1×1 → 3×3 → 1×1 at two
stage widths) with
    ours "bit"  finereg.standardize(..., "bit")   vs  timm StdConv2d (same formula)
    ours "ws"   finereg.standardize(..., "ws")    vs  the seed's / WS paper's naive module (same formula)
and, for inference (eval, no_grad), ours with the eval cache and ours baked vs plain nn.Conv2d.
Also the standardization alone (all weights of the stack, forward + backward, no convolution).

Targets: training ratio to timm ≤ 1.0; eval ratio to plain Conv2d ≤ 1.02. Exits 1 if results differ.

    python benchmarks/bench_ws.py                      # CPU, 1 thread, CPU-time clock; < 1 min
    python benchmarks/bench_ws.py --threads 0 --clock wall   # torch's threads, wall time
    python benchmarks/bench_ws.py --device cuda --batch 32 --scale 1 --threads 0
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from finereg.reparam.standardize import bake, standardize

try:
    from timm.layers import StdConv2d
except ImportError:  # pragma: no cover
    sys.exit("bench_ws needs timm (pip install timm)")


class SeedConv2d(nn.Conv2d):
    """Naive reference: the WS paper's / seed's module (mean over dims 1, 2, 3; unbiased std + 1e-5)."""

    def forward(self, x):
        w = self.weight
        w = w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        std = w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, w / std.expand_as(w), self.bias, self.stride, self.padding, self.dilation, self.groups)


# ResNet-50 stages: (block input/output channels, bottleneck width, spatial size at 224×224 input)
STAGES = {1: (256, 64, 56), 2: (512, 128, 28), 3: (1024, 256, 14), 4: (2048, 512, 7)}


def bottleneck(conv, c, mid):
    return nn.Sequential(conv(c, mid, 1), nn.ReLU(), conv(mid, mid, 3, padding=1), nn.ReLU(), conv(mid, c, 1))


def plain_conv(*a, **k):
    return nn.Conv2d(*a, bias=False, **k)


def seed_conv(*a, **k):
    return SeedConv2d(*a, bias=False, **k)


def timm_conv(*a, **k):
    return StdConv2d(*a, bias=False, **k)


def build(args):
    torch.manual_seed(0)
    stages = [STAGES[s] for s in args.stages]
    plain = nn.ModuleList(bottleneck(plain_conv, c, m) for c, m, _ in stages).to(args.device)
    inputs = [
        torch.randn(args.batch, c, max(2, round(s * args.scale)), max(2, round(s * args.scale)), device=args.device)
        for c, _, s in stages
    ]

    def like(conv_factory):
        m = nn.ModuleList(bottleneck(conv_factory, c, mid) for c, mid, _ in stages).to(args.device)
        m.load_state_dict(plain.state_dict())
        return m

    models = {"timm StdConv2d": like(timm_conv), "seed naive": like(seed_conv)}
    for variant in ("bit", "ws"):
        m = copy.deepcopy(plain)
        standardize(m, variant)
        models[f"ours {variant!r}"] = m
    models["plain Conv2d"] = plain
    return models, inputs


def train_step(model, inputs):
    """Forward + backward of every block with a fixed output gradient (no loss computation to dilute)."""
    with torch.no_grad():
        grads = [torch.randn_like(block(x)) for block, x in zip(model, inputs)]

    def step():
        for p in model.parameters():
            p.grad = None
        outs = [block(x) for block, x in zip(model, inputs)]
        torch.autograd.backward(outs, grads)
        return outs

    return step


def eval_step(model, inputs):
    def step():
        with torch.no_grad():
            return [block(x) for block, x in zip(model, inputs)]

    return step


def best_of(fns: dict, rounds: int, number: int, clock: str = "wall") -> dict:
    """Interleaved rounds (all functions once per round, shuffled order), best per function: robust to a
    shared, noisy machine.

    clock="wall": ``torch.utils.benchmark.Timer`` (wall time, synchronizes CUDA). clock="cpu": this process's
    CPU time (``time.process_time``): on a CPU shared with other jobs it does not count the time the process
    waits for a core, so it is far less noisy (use it with --threads 1: idle OpenMP threads spin).
    """
    if clock == "wall":
        timers = {k: Timer("f()", globals={"f": f}) for k, f in fns.items()}
        measure = {k: (lambda t=t: t.timeit(number).mean) for k, t in timers.items()}
    else:

        def cpu_time(f):
            t0 = time.process_time()
            for _ in range(number):
                f()
            return (time.process_time() - t0) / number

        measure = {k: (lambda f=f: cpu_time(f)) for k, f in fns.items()}
    for f in fns.values():  # warm-up
        f()
    best = {k: float("inf") for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no function always runs right after the same other one
        for k in order:
            best[k] = min(best[k], measure[k]())
    return best


def weight_grads(model):
    out = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            out.append(w.grad.clone())
    return out


def check_same(models, inputs, tol) -> list[str]:
    """Outputs and raw-weight gradients, in float64 copies: ours 'bit' vs timm, ours 'ws' vs seed."""
    errors = []
    models = {k: copy.deepcopy(m).double() for k, m in models.items()}
    inputs = [x.double() for x in inputs]
    for ours, ref in (("ours 'bit'", "timm StdConv2d"), ("ours 'ws'", "seed naive")):
        res = {}
        for name in (ours, ref):
            torch.manual_seed(1)  # same output gradients
            outs = train_step(models[name], inputs)()
            res[name] = [o.detach() for o in outs] + weight_grads(models[name])
        for a, b in zip(res[ours], res[ref]):
            if not torch.allclose(a, b, rtol=tol, atol=tol * 1e-2 * float(b.abs().max())):
                errors.append(f"{ours} differs from {ref}: max |diff| {float((a - b).abs().max()):.3g}")
                break
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[1, 3],
        choices=sorted(STAGES),
        help="ResNet-50 stages whose bottleneck convolutions are stacked (default: 1 3)",
    )
    ap.add_argument("--scale", type=float, default=0.5, help="spatial size relative to a 224×224 input (default 0.5)")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds, best kept (default 40)")
    ap.add_argument("--number", type=int, default=1, help="calls per timing (default 1)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared CPU, OpenMP threads waiting for a busy "
        "core dominate multi-threaded timings; 0 = torch's default)",
    )
    ap.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="wall time, or this process's CPU time (steadier on a shared CPU; with --threads 1). "
        "auto: cpu on a CPU device with one thread, wall otherwise",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"

    models, inputs = build(args)
    tol = 1e-6
    errors = check_same(models, inputs, tol)

    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU time; use --clock wall on an accelerator")
    print(
        f"clock={args.clock} device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
        f"stages={args.stages} "
        f"spatial={[tuple(x.shape[2:]) for x in inputs]} torch={torch.__version__}"
    )
    n_w = sum(m.weight.numel() for m in models["plain Conv2d"].modules() if isinstance(m, nn.Conv2d))
    print(f"{sum(isinstance(m, nn.Conv2d) for m in models['plain Conv2d'].modules())} convolutions, {n_w:,} weights")

    # the standardization alone: every weight of the stack, forward + backward (no convolution)
    # the standardization alone: every weight of the stack, forward + backward with a fixed Ŵ gradient
    def timm_ws(c):
        return F.batch_norm(
            c.weight.reshape(1, c.out_channels, -1), None, None, training=True, momentum=0.0, eps=c.eps
        ).reshape_as(c.weight)

    def seed_ws(c):
        w = c.weight
        w = w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        return w / (w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)

    ws_fns = {
        "ours 'bit'": lambda c: c.weight,
        "ours 'ws'": lambda c: c.weight,
        "timm StdConv2d": timm_ws,
        "seed naive": seed_ws,
    }
    ws_alone = {}
    for name, ws_fn in ws_fns.items():
        convs = [m for m in models[name].modules() if isinstance(m, nn.Conv2d)]
        w_grads = [torch.randn(c.weight.shape, device=args.device) for c in convs]
        ws_alone[name] = lambda convs=convs, ws_fn=ws_fn, w_grads=w_grads: torch.autograd.backward(
            [ws_fn(c) for c in convs], w_grads
        )
    t_ws = best_of(ws_alone, args.rounds, args.number, args.clock)
    print("\nstandardization alone (all weights, forward + backward):")
    for k, v in t_ws.items():
        print(f"  {k:<16} {v * 1e3:8.3f} ms")
    r_alone = t_ws["ours 'bit'"] / t_ws["timm StdConv2d"]
    print(f"  ratio ours 'bit' / timm StdConv2d = {r_alone:.3f}   (the part WS adds to a convolution)")

    t_train = best_of({k: train_step(m, inputs) for k, m in models.items()}, args.rounds, args.number, args.clock)
    print("\ntraining step (forward + backward):")
    for k, v in t_train.items():
        print(f"  {k:<16} {v * 1e3:8.2f} ms   ({v / t_train['plain Conv2d']:.3f}× plain)")
    r_bit = t_train["ours 'bit'"] / t_train["timm StdConv2d"]
    r_ws = t_train["ours 'ws'"] / t_train["timm StdConv2d"]
    r_seed = t_train["ours 'ws'"] / t_train["seed naive"]
    print(f"  ratio ours 'bit' / timm StdConv2d = {r_bit:.3f}   (target ≤ 1.0)")
    print(f"  ratio ours 'ws'  / timm StdConv2d = {r_ws:.3f}")
    print(f"  ratio ours 'ws'  / seed naive     = {r_seed:.3f}")

    cached = models["ours 'ws'"].eval()
    baked = copy.deepcopy(cached)
    bake(baked)
    plain = models["plain Conv2d"].eval()
    with torch.no_grad():
        for a, b in zip(eval_step(cached, inputs)(), eval_step(baked, inputs)()):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())):
                errors.append(f"baked outputs differ from cached: {float((a - b).abs().max()):.3g}")
    t_eval = best_of(
        {
            "plain Conv2d": eval_step(plain, inputs),
            "ours cached": eval_step(cached, inputs),
            "ours baked": eval_step(baked, inputs),
        },
        args.rounds,
        args.number,
        args.clock,
    )
    print("\ninference (eval, no_grad):")
    for k, v in t_eval.items():
        print(f"  {k:<16} {v * 1e3:8.2f} ms")
    print(
        f"  ratio ours cached / plain Conv2d = {t_eval['ours cached'] / t_eval['plain Conv2d']:.3f}   (target ≤ 1.02)"
    )
    print(f"  ratio ours baked  / plain Conv2d = {t_eval['ours baked'] / t_eval['plain Conv2d']:.3f}   (target ≤ 1.02)")

    if errors:
        print("\nRESULTS DIFFER:\n  " + "\n  ".join(errors))
        return 1
    print(
        f"\nresults agree: ours 'bit' = timm StdConv2d and ours 'ws' = seed (float64, rtol {tol:g}); "
        "baked = cached (float32, rtol 1e-4)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
