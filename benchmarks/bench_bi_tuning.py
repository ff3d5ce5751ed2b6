"""Bi-Tuning's training step against its floor, and its forward against two loop references.

1. The step (the headline): ``BiTuning.forward(im_q, im_k, labels)`` in training mode, tllib's objective
   ``CE(y_q, labels) + bi_tuning_loss(logits_z, logits_y, labels_c)`` and ``backward()``, timed against its floor
   measured in the same run: the work any exact implementation does, namely
     * the encoders: the query encoder's forward and backward, the key encoder's forward;
     * the two products against the C·K queue: z_q (b × P) · Q_z (P × C·K) and, for the classes present,
       w (u × (F+1)) · Q_h ((F+1) × C·K);
     * the projector product's backward, dS (b × C·K) · Q_zᵀ.
   The ratio step / floor is what the queue logic (reordering, log-softmax, enqueue, momentum update) adds; the
   ratio to the two forward products alone is printed beside it.
2. The forward against two references written here (outputs and queues compared first; exit 1 if they differ):
     * tllib-structured: tllib's own algorithm (``tllib/regularization/bi_tuning.py``) with its loops: per
       sample, the projector row by concatenating queue slices and the key enqueued one at a time; the classifier
       contrast as one (C·K) × C product, each sample then picking its column;
     * per-sample loop: the same, and the classifier contrast per sample as well (the paper's formula as written).

The encoder is deliberately cheap (identity backbone on random F-d features, a Linear head and a Linear
projector), so the queue logic dominates. Interleaved rounds (best and median); by default the process's CPU
time on one thread, which other processes on a shared machine do not inflate (``--clock wall`` for wall time).

    python benchmarks/bench_bi_tuning.py                       # C=200, K=40, b=48, F=2048, P=128, 1 thread
    python benchmarks/bench_bi_tuning.py --threads 2 --clock wall --classes 50 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from finereg.head.bi_tuning import BiTuning, BiTuningClassifier, bi_tuning_loss


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


def _step(module: BiTuning, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor) -> None:
    """One training step's computation: forward, tllib's objective, backward."""
    y_q, logits_z, logits_y, labels_c = module(im_q, im_k, labels)
    (F.cross_entropy(y_q, labels) + bi_tuning_loss(logits_z, logits_y, labels_c)).backward()


def _floor_parts(module: BiTuning, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor) -> dict:
    """The unavoidable work of a step, each part a callable on copies of the same operands."""
    enc_q, enc_k = module.encoder_q, module.encoder_k
    with torch.no_grad():
        _, z_q, _ = enc_q(im_q)
    q_z = module.queue_z.flatten(1).clone()
    q_h = module.queue_h.flatten(1).clone()
    w = torch.randn(len(torch.unique(labels)), q_h.shape[0])
    d_scores = torch.randn(len(labels), q_z.shape[1])

    def encoders():
        y, z, h = enc_q(im_q)
        with torch.no_grad():
            enc_k(im_k)
        (F.cross_entropy(y, labels) + z.sum() + h.sum()).backward()

    return {
        "encoders (query fwd+bwd, key fwd)": encoders,
        "z_q · Q_z (projector contrast)": lambda: z_q @ q_z,
        "w · Q_h (classifier contrast)": lambda: w @ q_h,
        "dS · Q_z^T (projector backward)": lambda: d_scores @ q_z.T,
    }


def _time(fns: dict, rounds: int, budget: float, threads: int, clock: str = "cpu") -> dict[str, list[float]]:
    """Interleaved best-of-N: every round times each callable once. ``clock="cpu"``: the process's CPU time per call
    (``time.process_time``: on a shared machine other processes' load does not count; with one thread it is the
    work done); ``"wall"``: ``torch.utils.benchmark`` wall time."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if clock == "wall":
                t = benchmark.Timer(stmt="fn()", num_threads=threads, globals=dict(fn=fn))
                once = t.timeit(1).mean
                number = int(budget / max(once, 1e-6))
                times[name].append(t.timeit(number).mean if number > 1 else once)
                continue
            fn()  # warm
            start, n = time.process_time(), 0
            while time.process_time() - start < budget or n == 0:
                fn()
                n += 1
            times[name].append((time.process_time() - start) / n)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--queue", "-K", type=int, default=40)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--projection", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="CPU time (default) or wall time")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best and median reported)")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per timing of the fast implementations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-loops", action="store_true", help="skip the (slow) loop references")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    fast = build(args.classes, args.queue, args.features, args.projection, 0.999, args.seed)
    impls = {
        "tllib-structured loop": (copy.deepcopy(fast), tllib_structured_forward),
        "per-sample loop": (copy.deepcopy(fast), loop_forward),
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
    print(
        f"C={args.classes} K={args.queue} b={args.batch} F={args.features} P={args.projection} "
        f"threads={args.threads}; outputs and queues match both references"
    )

    # 1. the training step against its floor
    step = copy.deepcopy(fast)
    parts = _floor_parts(fast, im_q, im_k, labels)
    times = _time(
        {"step": lambda: _step(step, im_q, im_k, labels), **parts}, args.rounds, args.budget, args.threads, args.clock
    )
    best = {name: min(v) for name, v in times.items()}
    floor = sum(best[name] for name in parts)
    products = best["z_q · Q_z (projector contrast)"] + best["w · Q_h (classifier contrast)"]
    print(
        f"\ntraining step (forward + tllib's objective + backward), {args.clock} time, best of {args.rounds} "
        "interleaved rounds:"
    )
    for name in parts:
        print(f"  floor part  {name:36s} {best[name] * 1e3:8.2f} ms")
    print(f"  floor                                               {floor * 1e3:8.2f} ms")
    print(
        f"  finereg step                                        {best['step'] * 1e3:8.2f} ms "
        f"(median {statistics.median(times['step']) * 1e3:.2f})"
    )
    print(
        f"  -> step / floor = {best['step'] / floor:.3f}x; step / the two forward queue products = "
        f"{best['step'] / products:.3f}x"
    )
    if args.no_loops:
        return 0

    # 2. the forward against the loop references (the fairest, tllib's structure, first)
    fns = {"finereg vectorized": fast}
    fns.update({name: (lambda *a, module=module, fn=fn: fn(module, *a)) for name, (module, fn) in impls.items()})
    times = _time(
        {name: (lambda fn=fn: fn(im_q, im_k, labels)) for name, fn in fns.items()},
        3,
        args.budget,
        args.threads,
        args.clock,
    )
    best = {name: min(v) for name, v in times.items()}
    print(f"\nforward only (training mode, autograd on), {args.clock} time, best of 3 interleaved rounds:")
    for name, v in times.items():
        ratio = (
            ""
            if name == "finereg vectorized"
            else f"  -> finereg is {best[name] / best['finereg vectorized']:.1f}x faster"
        )
        print(f"  {name:24s}: best {best[name] * 1e3:8.2f} ms, median {statistics.median(v) * 1e3:8.2f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
