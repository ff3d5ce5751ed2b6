"""Bi-Tuning forward: finereg's vectorized queue logic vs a per-sample-loop reference (tllib's loop semantics).

What is timed: one full ``BiTuning.forward(im_q, im_k, labels)`` in training mode: the query encoder, the momentum
update and forward of the key encoder, the projector contrast over the per-class queue, the enqueue of the batch's
keys, the classifier contrast, and the contrastive labels. The encoder is deliberately cheap (identity backbone on
random 2048-d features, a Linear head and a Linear projector), so the queue logic dominates, as it does in the
reference. Both implementations start from the same encoders and queues; the outputs and the queues after one
forward are compared first (exit 1 if they differ), then each is timed (best of N with torch.utils.benchmark).

    python benchmarks/bench_bi_tuning.py                       # C=200, K=40, b=48, F=2048, P=128
    python benchmarks/bench_bi_tuning.py --classes 50 --batch 32

The reference is written from the paper and tllib's loop semantics: for each sample in batch order, its projector
logits against its own class's queue then every other class's queue (gathered by concatenating queue slices),
then that sample's key is enqueued; afterwards the queue-vs-head logits and a second loop assembling each
sample's classifier-contrast row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from finereg.head.bi_tuning import BiTuning, BiTuningClassifier


@torch.no_grad()
def _momentum_step(module: BiTuning) -> None:
    for pq, pk in zip(module.encoder_q.parameters(), module.encoder_k.parameters()):
        pk.data = pk.data * module.m + pq.data * (1.0 - module.m)


def _contrast_row(query: torch.Tensor, queue: torch.Tensor, c: int) -> torch.Tensor:
    """query (D,) against queue (D, C, K): [own class's K keys, then the other classes' keys in class order]."""
    pos = query @ queue[:, c, :]
    neg = query @ torch.cat([queue[:, :c, :], queue[:, c + 1 :, :]], dim=1).flatten(1)
    return torch.cat([pos, neg])


def _enqueue_one(module: BiTuning, h: torch.Tensor, z: torch.Tensor, c: int) -> None:
    ptr = int(module.queue_ptr[c])
    module.queue_h[:, c, ptr] = h
    module.queue_z[:, c, ptr] = z
    module.queue_ptr[c] = (ptr + 1) % module.K


def _head_rows(module: BiTuning) -> torch.Tensor:
    head = module.encoder_q.head
    return F.normalize(torch.cat([head.weight.detach(), head.bias.detach()[:, None]], dim=1), dim=1)  # C x (F+1)


def _labels_c(n: int, C: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    labels_c = torch.zeros(n, 1 + C * K, dtype=dtype)
    labels_c[:, : K + 1] = 1.0 / (K + 1)
    return labels_c


def _projector_rows_loop(module: BiTuning, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor):
    """Both references' first half, per sample in batch order: its projector row against the queue as it was
    before the batch (own class first, then the other classes), then its key is enqueued."""
    y_q, z_q, h_q = module.encoder_q(im_q)
    with torch.no_grad():
        _momentum_step(module)
        _, z_k, h_k = module.encoder_k(im_k)
    queue_z = module.queue_z.clone()
    rows_z = []
    for i in range(len(labels)):
        c = int(labels[i])
        rows_z.append(torch.cat([(z_q[i] * z_k[i]).sum().view(1), _contrast_row(z_q[i], queue_z, c)]))
        with torch.no_grad():
            _enqueue_one(module, h_k[i], z_k[i], c)
    return y_q, z_q, h_q, rows_z


def loop_forward(module: BiTuning, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor):
    """Per-sample reference of ``BiTuning.forward`` (mutates ``module``'s key encoder and queues the same way).

    For each sample in batch order: its projector row against the queue as it was before the batch (own class
    first, then the other classes, by concatenating queue slices), then its key is enqueued. Then, for each
    sample, its classifier-contrast row: its head row w_c against the updated feature queue, the same way.
    """
    C, K, T = module.num_classes, module.K, module.temperature
    y_q, z_q, h_q, rows_z = _projector_rows_loop(module, im_q, im_k, labels)
    w = _head_rows(module)
    rows_y = []
    for i in range(len(labels)):
        c = int(labels[i])
        rows_y.append(torch.cat([(h_q[i] * w[c]).sum().view(1), _contrast_row(w[c], module.queue_h, c)]))
    return (
        y_q,
        F.log_softmax(torch.stack(rows_z) / T, dim=1),
        F.log_softmax(torch.stack(rows_y) / T, dim=1),
        _labels_c(len(labels), C, K, z_q.dtype),
    )


def tllib_structured_forward(module: BiTuning, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor):
    """Reference with tllib's structure: the projector loop as above, but the classifier contrast first scores
    the whole feature queue against all C head rows at once (a (C·K) x C product), and the per-sample loop only
    picks each sample's column."""
    C, K, T = module.num_classes, module.K, module.temperature
    y_q, z_q, h_q, rows_z = _projector_rows_loop(module, im_q, im_k, labels)
    w = _head_rows(module)
    cur = h_q @ w.T
    scores = (module.queue_h.flatten(1).T @ w.T).view(C, K, C)  # [class', k, class]
    rows_y = []
    for i in range(len(labels)):
        c = int(labels[i])
        neg = torch.cat([scores[:c, :, c], scores[c + 1 :, :, c]], dim=0).flatten()
        rows_y.append(torch.cat([cur[i, c].view(1), scores[c, :, c], neg]))
    return (
        y_q,
        F.log_softmax(torch.stack(rows_z) / T, dim=1),
        F.log_softmax(torch.stack(rows_y) / T, dim=1),
        _labels_c(len(labels), C, K, z_q.dtype),
    )


def build(classes: int, K: int, features: int, projection: int, m: float, seed: int) -> BiTuning:
    torch.manual_seed(seed)
    encoder = BiTuningClassifier(nn.Identity(), classes, projection, features_dim=features)
    return BiTuning(encoder, num_classes=classes, K=K, m=m).train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--queue", "-K", type=int, default=40)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--projection", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best and median reported)")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per timing of the fast implementations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    fast = build(args.classes, args.queue, args.features, args.projection, 0.999, args.seed)
    impls = {
        "per-sample loop": (copy.deepcopy(fast), loop_forward),
        "tllib-structured loop": (copy.deepcopy(fast), tllib_structured_forward),
    }
    g = torch.Generator().manual_seed(args.seed)
    im_q = torch.randn(args.batch, args.features, generator=g)
    im_k = im_q + 0.1 * torch.randn(args.batch, args.features, generator=g)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    labels[: min(3, args.batch)] = labels[0]  # several samples of one class in the batch

    out_fast = fast(im_q, im_k, labels)
    for name, (module, fn) in impls.items():
        out = fn(module, im_q, im_k, labels)
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(out_fast, out))
        same &= torch.allclose(fast.queue_h, module.queue_h) and torch.allclose(fast.queue_z, module.queue_z)
        same &= torch.equal(fast.queue_ptr, module.queue_ptr)
        if not same:
            print(f"MISMATCH: the vectorized forward and the {name} reference differ", file=sys.stderr)
            return 1

    # Interleaved best-of-N: the machine may be shared, so every round times each implementation once and the
    # minimum over rounds is reported (the least disturbed run), with the median beside it.
    fns = {"finereg vectorized": fast}
    fns.update({name: (lambda *a, module=module, fn=fn: fn(module, *a)) for name, (module, fn) in impls.items()})
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = benchmark.Timer(
                stmt="fn(im_q, im_k, labels)",
                num_threads=args.threads,
                globals=dict(fn=fn, im_q=im_q, im_k=im_k, labels=labels),
            )
            once = t.timeit(1).mean
            number = int(args.budget / max(once, 1e-6))
            times[name].append(t.timeit(number).mean if number > 1 else once)

    print(
        f"C={args.classes} K={args.queue} b={args.batch} F={args.features} P={args.projection} "
        f"threads={args.threads}; training-mode forward, autograd on; outputs and queues match"
    )
    best = {name: min(v) for name, v in times.items()}
    for name, v in times.items():
        ratio = (
            ""
            if name == "finereg vectorized"
            else f"  -> vectorized is {best[name] / best['finereg vectorized']:.1f}x faster"
        )
        print(
            f"{name:24s}: best {best[name] * 1e3:8.2f} ms, median {statistics.median(v) * 1e3:8.2f} ms "
            f"({len(v)} rounds){ratio}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
