"""DecoupledL2SP on a ResNet-50: what it adds to the optimizer's own step, against tllib's L2-SP penalty.

Side by side in one run, on the ResNet-50 of ``bench_l2sp_fused.py`` (159 anchored backbone tensors + a new
10-class head, 25.5 M values, float32, random init: no download):

  tllib        -- tllib's SPRegularization / L2Regularization written out (``bench_l2sp_fused.tllib_style``),
                  forward + backward into existing ``.grad``: what L2-SP costs a tllib user per step;
  sgd          -- the plain optimizer step: ``torch.optim.SGD(momentum=0.9, foreach=True).step()``;
  decoupled    -- ``DecoupledL2SP(SGD(...), alpha, beta).step()``, eager: a ``_foreach_lerp_`` pass before the step;
  decoupled (compiled) -- ``torch.compile(opt.step)`` (inductor): the decay is traced into the SGD update's graph
                  and fused with it (one extra read of θ0);
  no decay (compiled) -- the same compiled wrapper with α = β = 0 (the decay skipped): the SGD update traced the
                  same way, the fair baseline of the compiled form (torch's own compiled ``SGD.step``, which puts
                  graph breaks around its update, is printed beside it for reference);
  floor        -- the compiled SGD update streams five arrays (reads g, the momentum buffer and θ, writes the buffer
                  and θ); the fused decay adds a sixth, the read of θ0: its floor is 1/5 of that update's time.

The added cost of the decay is ``decoupled − sgd`` (eager) and ``decoupled (compiled) − no decay (compiled)``;
the ratios printed are tllib / added. The machine may be shared: each variant is timed in ``--rounds``
interleaved rounds and the fastest round's median is kept. Checks first that the compiled and eager
DecoupledL2SP steps give the same weights (rtol 1e-5), and exits non-zero if not.

    python benchmarks/bench_decoupled_l2sp.py [--threads 2] [--min-time 1] [--rounds 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).parent))
from bench_l2sp_fused import ALPHA, BETA, build, tllib_style  # noqa: E402  (the tllib reference, not duplicated)

from finereg.optim import DecoupledL2SP  # noqa: E402

LR = 0.01


def timed(variants: dict, min_time: float, rounds: int) -> dict[str, float]:
    """The fastest of ``rounds`` interleaved medians of each variant (a shared machine's load comes and goes)."""
    for fn in variants.values():
        fn()  # warm-up (and compilation)
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median
            best[name] = min(best[name], t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the fastest is kept)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source, target = build(torch.float32)
    params = list(target.parameters())
    source_weight = {n: p.detach().clone() for n, p in source.named_parameters() if not n.startswith("fc.")}
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)

    def sgd():
        return torch.optim.SGD(params, lr=LR, momentum=0.9, foreach=True)

    def decoupled(alpha=ALPHA, beta=BETA):
        return DecoupledL2SP(
            torch.optim.SGD(target.named_parameters(), lr=LR, momentum=0.9, foreach=True),
            source.state_dict(),
            alpha=alpha,
            beta=beta,
            new_params="fc.*",
        )

    plain, dec = sgd(), decoupled()
    anchors = [dec.state[p]["anchor"] for p in params if dec.state[p]["anchor"] is not None]
    n_el = sum(p.numel() for p in params)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32; ResNet-50: "
        f"{len(anchors)} anchored tensors + {len(params) - len(anchors)} new ({n_el / 1e6:.1f} M values)"
    )

    ok = True
    if not args.no_compile:  # the fused form computes the eager form's numbers
        start = copy.deepcopy(target.state_dict())
        results = []
        for compiled in (False, True):
            target.load_state_dict(start)
            opt = decoupled()
            step = torch.compile(opt.step) if compiled else opt.step
            for _ in range(2):
                step()
            results.append([p.detach().clone() for p in params])
        ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results))
        target.load_state_dict(start)
        plain, dec = sgd(), decoupled()

    variants = {
        "tllib": lambda: tllib_style(target, source_weight).backward(),
        "sgd": plain.step,
        "decoupled": dec.step,
    }
    if not args.no_compile:
        variants["sgd (torch compiled)"] = torch.compile(sgd().step)
        variants["no decay (compiled)"] = torch.compile(decoupled(0.0, 0.0).step)
        variants["decoupled (compiled)"] = torch.compile(dec.step)
    times = timed(variants, args.min_time, args.rounds)
    for name, t in times.items():
        print(f"  {name:22s} {t * 1e3:8.2f} ms")
    added = times["decoupled"] - times["sgd"]
    print(f"eager:    decay adds {added * 1e3:.2f} ms to the SGD step; tllib / added = {times['tllib'] / added:.1f}x")
    if not args.no_compile:
        added_c = times["decoupled (compiled)"] - times["no decay (compiled)"]
        floor = times["no decay (compiled)"] / 5
        print(
            f"compiled: decay adds {added_c * 1e3:.2f} ms to the SGD step (floor, one read of θ0: "
            f"{floor * 1e3:.2f} ms); tllib / added = {times['tllib'] / added_c:.1f}x; "
            f"compiled and eager steps {'agree' if ok else 'DIFFER'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
