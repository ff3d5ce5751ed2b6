"""Keras group penalty over ResNet-50's convolution kernels vs Keras's per-layer OrthogonalRegularizer.

Side by side in one run, torch backend, value + gradients w.r.t. all 53 conv kernels of
``keras.applications.ResNet50(weights=None)`` (23.5 M weights):

  floor   — each kernel's Gram matrix Kᵀ K (units × units) and its backward, nothing else: the matmuls any
            orthogonality penalty over the filters has to do;
  keras   — ``keras.regularizers.OrthogonalRegularizer(f, mode="columns")`` called on each layer's kernel
            reshaped to (fan-in, filters) (Keras refuses rank-4 kernels), summed: what a Keras user writes;
  finereg — ``finereg.keras.Orthogonality(WeightGroup(convs, axis=None), factor=f)()``: the same values, kernels
            of one shape batched into one matmul.

Checks that keras and finereg give the same value and gradients, prints the times and the ratio to keras (the
fairest reference, first): the median over rounds of the per-round ratio, the variants running round-robin so
that a busy machine slows each round alike. Exits non-zero on a mismatch.

    python benchmarks/bench_keras_group.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import torch  # noqa: E402
from keras import ops  # noqa: E402

import finereg.keras as fk  # noqa: E402


def timed(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round; the functions run round-robin, so a busy machine slows each round's
    runs alike and the per-round ratios stay comparable."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best and median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--factor", type=float, default=0.01)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    convs = [lay for lay in model.layers if isinstance(lay, keras.layers.Conv2D)]
    params = [c.kernel.value for c in convs]  # the torch Parameters behind the Keras variables
    per_layer = keras.regularizers.OrthogonalRegularizer(args.factor, mode="columns")
    ours = fk.Orthogonality(fk.WeightGroup(convs, axis=None), factor=args.factor)

    def keras_total():
        return sum(per_layer(ops.reshape(c.kernel, (-1, c.kernel.shape[-1]))) for c in convs)

    def floor_total():
        return sum(
            ops.sum(ops.matmul(ops.transpose(k), k)) for k in (ops.reshape(p, (-1, p.shape[-1])) for p in params)
        )

    def run(fn):
        for p in params:
            p.grad = None
        v = fn()
        v.backward()
        return v

    value_k = run(keras_total)
    grads_k = [p.grad.clone() for p in params]
    value_f = run(ours)
    grads_f = [p.grad.clone() for p in params]
    same_value = torch.allclose(value_f, value_k, rtol=1e-5)
    same_grads = all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()) for a, b in zip(grads_f, grads_k)
    )
    n = sum(p.numel() for p in params)
    shapes = len({tuple(p.shape) for p in params})
    print(
        f"ResNet-50 (Keras): {len(convs)} conv kernels, {n / 1e6:.1f} M weights, {shapes} distinct shapes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"value keras {value_k.item():.6f}  finereg {value_f.item():.6f}  equal: {same_value}; gradients equal: "
        f"{same_grads}"
    )
    rows = [
        ("keras per-layer OrthogonalRegularizer", keras_total),
        ("finereg Orthogonality group", ours),
        ("floor: Gram matmuls + backward", floor_total),
    ]
    results = timed({name: (lambda fn=fn: run(fn)) for name, fn in rows}, args.repeats)
    base = results[rows[0][0]]
    print(f"{'value + gradients':40s} {'best ms':>9s} {'median ms':>10s} {'vs keras (median of rounds)':>28s}")
    for name, ts in results.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f"{name:40s} {min(ts) * 1e3:9.1f} {statistics.median(ts) * 1e3:10.1f} {ratio:27.2f}x")
    return 0 if same_value and same_grads else 1


if __name__ == "__main__":
    sys.exit(main())
