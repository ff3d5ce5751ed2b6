"""DELTA's attention classifier: the pretrained backbone with a new head, the head trained on frozen features.

DELTA measures its channel attention (:mod:`finereg.feature.attention`) with a classifier made of the pretrained
network and a head for the target classes, trained on the target data with the pretrained features frozen
(SGD with momentum, Nesterov, the learning rate × 0.1 every ``lr_decay_epochs``, decayed exponentially per
epoch: lr_e = lr · 0.1^(e / lr_decay_epochs)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .._checks import FineregError, FineregTypeError, check_int, check_number
from .._utils import get_submodule, unwrap
from ._batches import Criterion, _call, _LossFns, _unpack

__all__ = ["train_attention_classifier"]


def train_attention_classifier(
    model: nn.Module,
    head: str | nn.Module,
    batches: Iterable,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    lr_decay_epochs: float = 6,
    criterion: Criterion | None = None,
) -> list[float]:
    """Train the new ``head`` of ``model`` on frozen pretrained features, as DELTA prescribes for its attention
    classifier; returns the mean loss of each epoch. ``model`` is trained in place.

    Only the head's parameters are trained; every other parameter is frozen (``requires_grad`` off) and every other
    module stays in eval mode (BatchNorm keeps its running statistics: the features are those of the pretrained
    network). Defaults are tllib's DELTA script: 10 epochs, SGD(lr 0.01, momentum 0.9, Nesterov, weight decay 0),
    the learning rate × 0.1 every ``lr_decay_epochs`` = 6 epochs, decayed exponentially per epoch.
    Parameter flags and train/eval modes are restored afterwards.
    How this differs from tllib's script: docs/feature_penalties.md.
    """
    if isinstance(head, str):
        head_module = get_submodule(model, head)
    elif isinstance(head, nn.Module):
        if not any(m is head for m in unwrap(model).modules()):
            raise FineregError("head is not a submodule of model; pass the head module of this model or its name")
        head_module = head
    else:
        raise FineregTypeError(f"head must be a submodule name or an nn.Module, got {type(head).__name__}")
    head_params = list(head_module.parameters())
    if not head_params:
        raise FineregError(f"head {head!r} has no parameters to train")
    epochs = check_int(epochs, "epochs", low=1)
    check_number(lr, "lr", low=0, low_open=True)
    check_number(lr_decay_epochs, "lr_decay_epochs", low=0, low_open=True)
    if iter(batches) is batches and epochs > 1:
        raise FineregTypeError("batches is a one-pass iterator but epochs > 1; pass a DataLoader or a list")
    loss_fn = _LossFns(criterion)
    root = unwrap(model)
    modes = {m: m.training for m in root.modules()}
    flags = {p: p.requires_grad for p in root.parameters()}
    head_ids = {id(p) for p in head_params}
    try:
        root.eval()
        head_module.train()
        for p in root.parameters():
            p.requires_grad_(id(p) in head_ids)
        opt = torch.optim.SGD(
            head_params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(0.1) / lr_decay_epochs))
        history = []
        for _ in range(epochs):
            total, count = 0.0, 0
            for i, batch in enumerate(batches):
                inputs, labels = _unpack(batch, i)
                loss = loss_fn(_call(model, inputs), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item(), count + 1
            if count == 0:
                raise FineregError("batches gave no (inputs, labels) pairs")
            history.append(total / count)
            sched.step()
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return history
