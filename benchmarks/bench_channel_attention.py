"""DELTA channel attention on a ResNet-18: tllib's per-channel loop vs finereg's batched exact ablation, and Taylor.

Side by side in one run, on the same model (torchvision ResNet-18, random init, eval mode) and the same batches:
  naive    — tllib's procedure (its DELTA script): for every batch, the loss of the model, then for every selected
             layer and every output channel j: ``state_dict()[layer.weight][j] = 0``, a full forward, the loss
             increase, restore; running mean over batches. Run under ``torch.no_grad()`` (tllib keeps autograd on,
             which would only make it slower).
  exact    — ``finereg.feature.attention.channel_importance(method="exact")``: the network before the layer runs once
             per batch, the ablations go through the rest of it in chunks folded into the batch (torch.fx split).
  taylor   — ``method="taylor"``: one forward + backward per batch, first-order estimate.
Checks that naive and exact give the same loss increases and the same attention (float32 tolerances, below), prints
the times, the speed-up per layer and in total, and the Spearman rank correlation of taylor with exact per layer.
Exits non-zero when naive and exact differ.

    python benchmarks/bench_channel_attention.py [--layers layer3.1.conv2 layer4.1.conv2] [--batches 2]
        [--batch-size 16] [--size 64] [--threads N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from finereg.feature.attention import attention_from_importance, channel_importance


def naive_loop(model, layers, batches):
    """tllib's calculate_channel_attention loop (without its classifier training), one channel at a time."""
    weights = [torch.zeros(model.get_submodule(n).out_channels, dtype=torch.float64) for n in layers]
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            loss0 = F.cross_entropy(model(x), y)
            for li, name in enumerate(layers):
                w = model.state_dict()[name + ".weight"]
                for j in range(w.shape[0]):
                    tmp = w[j].clone()
                    w[j] = 0.0
                    diff = (F.cross_entropy(model(x), y) - loss0).item()
                    weights[li][j] = (i * weights[li][j] + diff) / (i + 1)
                    w[j] = tmp
    return weights


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--layers",
        nargs="+",
        default=["layer3.1.conv2", "layer4.1.conv2"],
        help="DELTA regularizes the last conv of a stage (tllib's ResNet-50 list: layerN.<last>.conv3)",
    )
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="image side (pixels)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3, help="best of N for exact and taylor (naive runs once)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchvision.models import resnet18

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=args.classes).to(dtype).eval()
    batches = [
        (
            torch.randn(args.batch_size, 3, args.size, args.size, dtype=dtype),
            torch.randint(0, args.classes, (args.batch_size,)),
        )
        for _ in range(args.batches)
    ]
    print(
        f"ResNet-18 (random init, eval), {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
        f"{args.dtype}, {torch.get_num_threads()} threads, layers {args.layers}"
    )

    channel_importance(model, args.layers, batches[:1], max_batches=1)  # warm-up (first-call overheads)
    # The machine may be shared: time naive and exact on each (layer, batch) one right after the other, so that both
    # see the same load, and sum. Loss increases are then averaged over batches (tllib's running mean = the mean).
    naive = {n: [] for n in args.layers}
    exact_parts = {n: [] for n in args.layers}
    t_naive = dict.fromkeys(args.layers, 0.0)
    t_exact = dict.fromkeys(args.layers, 0.0)
    for batch in batches:
        for name in args.layers:
            (w,), t = timed(lambda name=name, batch=batch: naive_loop(model, [name], [batch]))
            naive[name].append(w)
            t_naive[name] += t
            best = float("inf")
            for _ in range(args.repeats):
                r, t = timed(lambda name=name, batch=batch: channel_importance(model, [name], [batch]))
                best = min(best, t)
            exact_parts[name].append(r[name])
            t_exact[name] += best
    naive = {n: torch.stack(v).mean(0) for n, v in naive.items()}
    exact_parts = {n: torch.stack(v).mean(0) for n, v in exact_parts.items()}
    exact, t_all = timed(lambda: channel_importance(model, args.layers, batches))  # all layers and batches at once
    taylor, t_taylor = None, float("inf")
    for _ in range(args.repeats):
        r, t = timed(lambda: channel_importance(model, args.layers, batches, method="taylor"))
        taylor, t_taylor = r, min(t_taylor, t)

    print(f"\ntimes in seconds, summed over the batches (exact and taylor: best of {args.repeats}):")
    for name in args.layers:
        print(
            f"  {name:<16} {naive[name].numel():4d} channels  naive {t_naive[name]:8.2f}  exact {t_exact[name]:7.3f}"
            f"  speed-up {t_naive[name] / t_exact[name]:6.1f}x"
        )
    total_naive, total_exact = sum(t_naive.values()), sum(t_exact.values())
    print(
        f"  all layers             naive {total_naive:8.2f}  exact {total_exact:7.3f}  speed-up "
        f"{total_naive / total_exact:6.1f}x"
    )
    print(
        f"  (one call for all layers and batches: exact {t_all:.3f} s; taylor {t_taylor:.3f} s, "
        f"{total_naive / t_taylor:.0f}x faster than naive)"
    )

    ok = True
    att_naive = attention_from_importance(naive)
    att_exact = attention_from_importance(exact)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    print("\nagreement of naive and exact, per layer:")
    for name in args.layers:
        wn, we = naive[name], exact[name]
        scale = wn.abs().max().item()
        d_raw = max((wn - we).abs().max().item(), (wn - exact_parts[name]).abs().max().item())
        d_att = ((att_naive[name] - att_exact[name]).abs() / att_naive[name]).max().item()
        rho = spearmanr(wn.numpy(), we.numpy()).statistic
        good = d_raw <= tol * max(1.0, scale)
        ok &= good
        print(
            f"  {name:<16} max|Δ loss increase| {d_raw:.1e} (largest increase {scale:.1e}), max relative Δ "
            f"attention {d_att:.1e}, Spearman {rho:.4f}  {'OK' if good else 'MISMATCH'}"
        )
    print("\ntaylor vs exact, Spearman rank correlation per layer:")
    for name in args.layers:
        print(f"  {name:<16} {spearmanr(taylor[name].numpy(), exact[name].numpy()).statistic:.3f}")
    if not ok:
        print("FAIL: naive and exact channel attention differ", file=sys.stderr)
        return 1
    print(f"\nRESULT same loss increases; exact batched is {total_naive / total_exact:.1f}x faster than the naive loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
