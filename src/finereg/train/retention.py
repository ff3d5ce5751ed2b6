"""Forgetting, measured: how much of the source task a fine-tuned network still does.

The **retention** of a run is the top-1 agreement, on the clean test images, between the fine-tuned backbone read
by the *original* pretrained classifier and the pretrained model itself:

    retention = 100 · (1/N) Σ_i 1[ argmax h0(f_θ(x_i)) = argmax h0(f_θ0(x_i)) ]

with f_θ the fine-tuned backbone, f_θ0 the pretrained one and h0 the pretrained classifier (ImageNet's 1000
classes), a copy kept frozen even when a method trains the source head (Co-Tuning). It is what LwF and Co-Tuning
are meant to keep; 100 % means the source function is intact. The reference predictions are computed once per
process and protocol (before any training); each evaluation of the test split reads the backbone's features once
for both heads, so the metric costs no extra forward of the backbone.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Retention", "source_reference"]


class Retention(NamedTuple):
    """The frozen original classifier ``head`` and its predicted class ``reference[i]`` for test image i."""

    head: nn.Module
    reference: Tensor


_MEMO: dict[tuple, Tensor] = {}


@torch.no_grad()
def source_reference(net: nn.Module, test, key: tuple, device: torch.device, batch_size: int = 256) -> Retention:
    """The :class:`Retention` of ``net`` (a :class:`~finereg.train.models.TransferNet` at its pretrained weights,
    with a ``source_head``) on the in-memory ``test`` set; ``key`` names what the reference depends on (data,
    architecture, weights, resolution, prefix), the predictions are memoized under it."""
    head = copy.deepcopy(net.source_head).eval().requires_grad_(False)
    if key not in _MEMO:
        was = net.training
        net.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                preds = [head(net.backbone(b.x)).argmax(1).cpu() for b in test.eval_batches(batch_size, device)]
        finally:
            net.train(was)
        if len(_MEMO) >= 8:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = torch.cat(preds)
    return Retention(head, _MEMO[key].to(device))
