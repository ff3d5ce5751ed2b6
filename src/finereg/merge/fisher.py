"""The diagonal Fisher information of a classifier, for the Fisher-weighted WiSE-FT merge.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022; used by WiSE-FT's official code
(mlfoundations/wise-ft ``src/models/fisher.py``)::

    F_j = 1/N · Σ_n (∂/∂θ_j  log p(ŷ_n | x_n; θ))²

over the N samples of the batches, one squared gradient per sample (the official code runs batches of one
sample). ``labels="sampled"`` (official): ŷ_n is drawn from the model's own predictive distribution
softmax(f(x_n)) (a Monte-Carlo estimate of the true Fisher); ``labels="given"``: ŷ_n is the batch's label (the
"empirical" Fisher).

Per-sample gradients are computed in one vectorized pass per batch (``torch.func.vmap`` of ``grad`` over the
samples, with ``functional_call``), not one backward per sample. The model runs in eval mode (BatchNorm on its
running statistics, no dropout): the official code runs train mode on batches of one, where BatchNorm has no batch
to normalize over. The result is keyed by parameter name (trainable parameters only), ready for
``wise_ft(..., fishers=(F0, F1))``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, check_choice, check_int
from .._utils import unwrap

__all__ = ["fisher_diagonal"]


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable,
    *,
    labels: str = "sampled",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` over ``batches`` of ``(x, y, ...)`` (``y`` unused when ``labels`` is
    ``"sampled"``), as name → tensor for each trainable parameter (see the module docstring).

    Args:
        model: a classifier returning (batch, classes) logits.
        batches: an iterable of ``(x, y, ...)`` tuples (a DataLoader).
        labels: ``"sampled"`` (official: drawn from the model's prediction) or ``"given"`` (the batch labels).
        generator: the random generator of the sampled labels (on the model's device).
        chunk_size: samples per vectorized chunk (``torch.func.vmap``'s ``chunk_size``; lower it to save memory).
    """
    from torch.func import functional_call, grad, vmap

    check_choice(labels, "labels", ("sampled", "given"))
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    net = unwrap(model)
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    if not params:
        raise FineregError("the model has no trainable parameter (requires_grad=True) to compute a Fisher for")
    buffers = dict(net.named_buffers())
    device = next(iter(params.values())).device

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(net, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(_logits(out), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    names = list(params)
    total = torch.zeros(sum(p.numel() for p in params.values()), device=device, dtype=torch.float64)
    count = 0
    n_classes = None
    was_training = net.training
    net.eval()
    try:
        for k, batch in enumerate(batches):
            if not (isinstance(batch, (list, tuple)) and len(batch) >= (2 if labels == "given" else 1)):
                raise FineregError("batches must yield (inputs, labels, ...) tuples")
            if not isinstance(batch[0], Tensor) or batch[0].dim() == 0 or not len(batch[0]):
                raise FineregError(
                    f"batch {k} has no sample (inputs {_shape(batch[0])}): every batch needs inputs of shape "
                    "(samples >= 1, ...); drop empty batches"
                )
            x = batch[0].to(device)
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise FineregError(f"batch {k}'s inputs hold NaN or inf: the Fisher would be NaN; clean the data")
            if labels == "given":
                y = torch.as_tensor(batch[1]).to(device).long()
                if n_classes is None:
                    with torch.no_grad():
                        n_classes = _logits(net(x[:1])).shape[1]
                if y.shape != (len(x),) or int(y.min()) < 0 or int(y.max()) >= n_classes:
                    got = f"range [{int(y.min())}, {int(y.max())}]" if y.dim() == 1 and len(y) else _shape(y)
                    raise FineregError(
                        f"batch {k}'s labels must be {len(x)} class indices in 0..{n_classes - 1} (the model has "
                        f"{n_classes} outputs), got {got}"
                    )
            else:
                with torch.no_grad():
                    logits = _logits(net(x))
                if not torch.isfinite(logits).all():
                    raise FineregError(f"the model's outputs on batch {k} hold NaN or inf: no label can be sampled")
                y = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).view(-1)
            g = per_sample(params, x, y)
            flat = torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)  # (samples, all weights)
            total.add_(flat.square().sum(0, dtype=torch.float64))
            count += len(x)
    finally:
        net.train(was_training)
    if count == 0:
        raise FineregError("batches yielded no sample")
    if not torch.isfinite(total).all():
        raise FineregError("the Fisher holds NaN or inf: the model's weights or outputs are not finite")
    total /= count
    sizes = [params[n].numel() for n in names]
    return {n: t.view_as(params[n]).to(params[n].dtype) for n, t in zip(names, torch.split(total, sizes))}


def _logits(out: object) -> Tensor:
    """The model's output, checked to be (batch, classes) logits."""
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = f"a {type(out).__name__}" if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise FineregError(
            f"the model must return (batch, classes) logits as one tensor, got {got}: wrap it in a module whose "
            "forward returns the logits only (e.g. model(x)[0])"
        )
    return out


def _shape(t: object) -> str:
    return f"of shape {tuple(t.shape)}" if isinstance(t, Tensor) else f"a {type(t).__name__}"
