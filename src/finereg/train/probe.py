"""The linear probe of a run: LP-FT's stage 1 on the frozen pretrained features of the training set.

Two users: the ``lp-ft`` method (its new head before fine-tuning, :mod:`finereg.train.recipes.robust`) and
``finereg wise-ft`` (θ0's head, for a network without a zero-shot head: :mod:`finereg.train.wise_ft`).

Features φ(x) = the backbone's pooled output, in eval mode, without augmentation (each image's evaluation view),
in float32. The probe is :func:`finereg.fit_linear_probe` (Kumar et al., ICLR 2022; official
``log_reg_sk.py``): multinomial logistic regression on standardized features, its L2 strength λ chosen by
validation accuracy on the data's ``valid`` split when it has one, else on the function's own stratified 20 %
holdout of the training features (the probe then refit on all of them) — never on the test split. Under
torch.distributed the probe is fitted on rank 0 and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..lp_ft import LinearProbe, fit_linear_probe
from . import dist as fdist
from .data import TrainData
from .models import TransferNet

__all__ = ["pretrained_features", "probe_head"]


@torch.no_grad()
def pretrained_features(net: TransferNet, images, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(features (N, D), labels (N,)) of ``net.backbone`` on ``images`` (eval mode, no augmentation, float32,
    on ``device``); unreadable images are left out."""
    backbone = net.backbone
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for b in images.eval_batches(batch_size, device):
            if b.y.numel():
                feats.append(backbone(b.x).float().flatten(1))
                labels.append(b.y)
    finally:
        backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


def probe_head(
    net: TransferNet,
    data: TrainData,
    batch_size: int,
    device: torch.device,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> LinearProbe:
    """The linear probe of ``net``'s pretrained features on ``data.train`` (λ chosen on ``data.valid`` if
    present, else on a holdout of the training features), fitted on rank 0 and broadcast to all ranks."""
    n_classes, dim = len(data.classes), net.head.in_features
    weight = torch.zeros(n_classes, dim, device=device)
    bias = torch.zeros(n_classes, device=device)
    meta = None
    if fdist.rank() == 0:
        x, y = pretrained_features(net, data.train, batch_size, device)
        val = pretrained_features(net, data.valid, batch_size, device) if data.valid is not None else (None, None)
        probe = fit_linear_probe(x, y, *val, num_classes=n_classes, seed=seed)
        weight.copy_(probe.weight)
        bias.copy_(probe.bias)
        meta = (probe.l2, probe.path, probe.val_accuracy)
    fdist.broadcast_tensor(weight)
    fdist.broadcast_tensor(bias)
    l2, path, val_accuracy = fdist.broadcast_object(meta)
    if log is not None:
        on = "the validation split" if data.valid is not None else "a 20 % holdout of the training features"
        acc = f"held-out accuracy {100 * val_accuracy:.1f} %"
        log(f"linear probe on the pretrained features: L2 {l2:g} chosen on {on} ({acc})")
    return LinearProbe(weight, bias, l2, path, val_accuracy)
