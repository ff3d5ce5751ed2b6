"""L2-SP on a ResNet-50's parameters: the fused ``add_grad_()`` vs the penalty + its backward.

Side by side in one run, each adding ∂Ω/∂w into existing ``.grad`` tensors (as after ``loss.backward()``),
Ω = α/2 Σ‖w − w0‖² over the 159 backbone tensors + β/2 Σ‖w‖² over a new 10-class head:
  tllib   — tllib's SPRegularization/L2Regularization code written out (a Python loop of
            ``0.5 * torch.norm(w - w0) ** 2``), then ``backward()``;
  penalty — finereg ``L2SP(...)()`` (multi-tensor ``_foreach_sub`` / ``_foreach_norm``), then ``backward()``;
  fused   — finereg ``L2SP(...).add_grad_()``: ``_foreach_sub`` + ``_foreach_add_`` into ``.grad`` under
            ``no_grad``, no autograd graph.
Checks that the three leave the same gradients (rtol 1e-6 in float64, 1e-5 in float32), prints the times
and the ratios, and exits non-zero if the gradients differ. ResNet-50 from torchvision, random init (no
download).

    python benchmarks/bench_l2sp_fused.py [--dtype float32] [--threads 2] [--min-time 2]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn
from torch.utils.benchmark import Timer

from finereg.weight.l2 import L2SP

ALPHA, BETA = 0.01, 0.001


def build(dtype: torch.dtype):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    source = resnet50(weights=None).to(dtype)
    target = copy.deepcopy(source)
    target.fc = nn.Linear(2048, 10).to(dtype)  # a new head: no anchor, plain L2
    with torch.no_grad():  # fine-tuning has moved the weights a little
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return source, target


def tllib_style(target: nn.Module, source_weight: dict) -> torch.Tensor:
    out = 0.0
    for name, p in target.named_parameters():
        if name in source_weight:
            out = out + ALPHA * 0.5 * torch.norm(p - source_weight[name]) ** 2
        else:
            out = out + BETA * 0.5 * torch.norm(p) ** 2
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    source, target = build(dtype)
    params = list(target.parameters())
    reg = L2SP(target, source, alpha=ALPHA, beta=BETA, new_params="fc.*")
    source_weight = {n: p.detach().clone() for n, p in source.named_parameters() if not n.startswith("fc.")}
    n_el = sum(p.numel() for p in params)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.dtype}; ResNet-50: "
        f"{len(reg.anchored_names)} anchored tensors + {len(reg.unanchored_names)} new ({n_el / 1e6:.1f} M values)"
    )

    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]  # the task loss's gradients

    def reset():
        for p, g in zip(params, base):
            p.grad = g.clone()

    variants = {
        "tllib": lambda: tllib_style(target, source_weight).backward(),
        "penalty": lambda: reg().backward(),
        "fused": lambda: reg.add_grad_(),
    }
    results = {}
    for name, fn in variants.items():
        reset()
        fn()
        results[name] = [p.grad.clone() for p in params]
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    ok = True
    for name in ("penalty", "fused"):
        for n, a, b in zip((n for n, _ in target.named_parameters()), results[name], results["tllib"]):
            if not torch.allclose(a, b, **tol):
                print(f"MISMATCH {name} vs tllib at {n}: max |diff| {(a - b).abs().max().item():.3g}")
                ok = False
                break
    changed = max((a - b).abs().max().item() for a, b in zip(results["fused"], base))
    assert changed > 0, "the regularizer added nothing"

    times = {}
    for name, fn in variants.items():
        reset()
        fn()  # warm-up
        times[name] = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=args.min_time).median
    for name, t in times.items():
        print(f"  {name:8s} {t * 1e3:8.2f} ms")
    print(
        f"ratio penalty+backward / fused: {times['penalty'] / times['fused']:.2f}x; "
        f"tllib loop / fused: {times['tllib'] / times['fused']:.2f}x; "
        f"gradients {'agree' if ok else 'DIFFER'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
