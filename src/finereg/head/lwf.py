"""Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017).

The fine-tuned network keeps the pretrained model's own classifier (the *source head*) beside a new
*target head* on the shared backbone. Before training, the pretrained model's outputs on the target images
(deterministic transforms) are recorded, y_o. Training minimizes

    L = CE(y_t, labels) + λ · KD_T(y_s, y_o)

where y_s is the source head's current output and KD_T is the distillation loss of
:mod:`finereg.head.kd` (the paper: T = 2, λ = 1). The distillation term keeps the source task's outputs
(what the network "knew") while the target task is learned.

Pieces:

* :class:`LwFClassifier` — backbone + source head + target head; in training returns ``(y_s, y_t)``, in eval
  ``y_t``. Built from any backbone + head, or split from a pretrained classifier by
  :meth:`LwFClassifier.from_pretrained`.
* :func:`record_source_predictions` — y_o over a loader, keyed by sample index, optionally cached on disk.
* :class:`IndexedDataset` — wraps a dataset so each item also carries its index (for shuffled training).
* :meth:`LwFClassifier.param_groups` — the optimizer groups of :mod:`finereg.lr_policy` (tllib's layout).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_choice, check_int
from .._utils import get_submodule, unwrap
from ..lr_policy import ROLES, Role, param_groups
from ._cache import cached, loader_fingerprint, make_key, module_fingerprint
from ._source import batch_parts, source_outputs, split_classifier

__all__ = ["LwFClassifier", "new_head_like", "record_source_predictions", "IndexedDataset"]


def new_head_like(head_source: nn.Module, num_classes: int) -> nn.Module:
    """A fresh target head shaped like ``head_source`` with ``num_classes`` outputs.

    A ``Linear`` source head gives ``Linear(in_features, num_classes)``; a composite head (e.g. VGG's or
    ConvNeXt's ``classifier``) is copied and its last ``Linear`` replaced by a new one with ``num_classes``
    outputs (the other layers keep their pretrained weights).
    """
    _check_num_classes(num_classes)
    if isinstance(head_source, nn.Linear):
        return nn.Linear(head_source.in_features, num_classes, bias=head_source.bias is not None)
    linears = [name for name, m in head_source.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FineregError(
            f"cannot build a target head like {type(head_source).__name__}: it has no nn.Linear "
            "layer to resize; pass head_target=... explicitly"
        )
    head = copy.deepcopy(head_source)
    last = get_submodule(head, linears[-1])
    parent_name, _, child = linears[-1].rpartition(".")
    parent = get_submodule(head, parent_name) if parent_name else head
    setattr(
        parent,
        child,
        nn.Linear(last.in_features, num_classes, bias=last.bias is not None).to(
            device=last.weight.device, dtype=last.weight.dtype
        ),
    )
    return head


def _check_num_classes(num_classes: Any) -> None:
    check_int(num_classes, "num_classes", low=1)


class LwFClassifier(nn.Module):
    """Backbone with the pretrained (source) head and a new target head.

    forward(x): f = pool(backbone(x)); y_s = head_source(f); y_t = head_target(bottleneck(f)).
    In training mode returns ``(y_s, y_t)``; in eval mode ``y_t`` (override with ``return_both``).

    Args:
        backbone: maps inputs to the features the source head expects (pooled/flattened already).
        head_source: the pretrained model's classifier head.
        num_classes: number of target classes; builds ``head_target`` with :func:`new_head_like` (the
            bottleneck must then keep the feature size) unless ``head_target`` is given.
        head_target: the target head (optional if ``num_classes`` is given).
        bottleneck: optional module between the features and the target head (not the source head).
        pool: optional module applied to the backbone's output before both heads (e.g. pooling + flatten).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_source: nn.Module,
        num_classes: int | None = None,
        *,
        head_target: nn.Module | None = None,
        bottleneck: nn.Module | None = None,
        pool: nn.Module | None = None,
    ):
        super().__init__()
        for name, m in (("backbone", backbone), ("head_source", head_source)):
            if not isinstance(m, nn.Module):
                raise FineregTypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        if head_target is None:
            if num_classes is None:
                raise FineregError("give num_classes (to build a new target head) or head_target")
            head_target = new_head_like(head_source, num_classes)
        elif not isinstance(head_target, nn.Module):
            raise FineregTypeError(f"head_target must be an nn.Module, got {type(head_target).__name__}")
        elif num_classes is not None:
            _check_num_classes(num_classes)
        self.backbone = backbone
        self.pool_layer = nn.Identity() if pool is None else pool
        self.bottleneck = nn.Identity() if bottleneck is None else bottleneck
        self.head_source = head_source
        self.head_target = head_target
        self.num_classes = num_classes

    def forward(self, x: Tensor, return_both: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
        f = self.pool_layer(self.backbone(x))
        y_t = self.head_target(self.bottleneck(f))
        if self.training if return_both is None else return_both:
            return self.head_source(f), y_t
        return y_t

    def source_logits(self, x: Tensor) -> Tensor:
        """The source head's output only, head_source(pool(backbone(x)))."""
        return self.head_source(self.pool_layer(self.backbone(x)))

    def param_parts(self, source_head: Role = "excluded") -> dict[str, Role]:
        """The parts and their learning-rate roles (:mod:`finereg.lr_policy`): the backbone (and a pool with
        parameters) pretrained, the bottleneck and target head new, and the source head ``source_head``:
        ``"excluded"`` (tllib's LwF: left out of the optimizer), ``"pretrained"`` (tllib's Co-Tuning layout, and
        LwF's paper, which trains the old task's head too) or ``"new"``."""
        parts: dict[str, Role] = {"backbone": "pretrained"}
        if any(True for _ in self.pool_layer.parameters()):
            parts["pool_layer"] = "pretrained"
        parts["head_source"] = check_choice(source_head, "source_head", ROLES)
        parts.update(bottleneck="new", head_target="new")
        return parts

    def param_groups(self, lr: float, *, pretrained_lr_mult: float = 0.1, source_head: Role = "excluded") -> list[dict]:
        """Optimizer groups: :func:`finereg.lr_policy.param_groups` of :meth:`param_parts` (new parts at ``lr``,
        pretrained parts at ``pretrained_lr_mult · lr``)."""
        return param_groups(self, lr, self.param_parts(source_head), pretrained_lr_mult=pretrained_lr_mult)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, num_classes: int, head_name: str | None = None, copy_model: bool = True
    ) -> LwFClassifier:
        """Split a pretrained torchvision, timm or any classifier: its final ``nn.Linear`` (or the submodule
        ``head_name``) becomes the source head and is replaced by ``nn.Identity`` in the backbone, which then
        returns the head's input (see :mod:`finereg.head._source`). The model is deep-copied unless
        ``copy_model=False``."""
        backbone = copy.deepcopy(unwrap(model)) if copy_model else unwrap(model)
        backbone, head, _ = split_classifier(backbone, head_name)
        return cls(backbone, head, num_classes)


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i] + (i,)``: each item also carries its index, so recorded targets can be looked up in a
    shuffled loader: ``x, y, idx = batch; targets[idx]``."""

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise FineregTypeError("IndexedDataset needs a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


def _is_shuffled(loader: Iterable) -> bool:
    sampler = getattr(loader, "sampler", None)
    return sampler is not None and not isinstance(sampler, torch.utils.data.SequentialSampler)


def _refuse_shuffled_without_indices(loader: Iterable) -> Iterator:
    """The batches of ``loader``; a shuffling loader whose first batch carries no indices is refused at once."""
    for i, batch in enumerate(loader):
        if i == 0 and batch_parts(batch)[2] is None and _is_shuffled(loader):
            raise FineregError(
                "the loader shuffles but its batches carry no sample indices: use shuffle=False or wrap the "
                "dataset in IndexedDataset"
            )
        yield batch


@torch.no_grad()
def record_source_predictions(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_key: str | None = None,
) -> Tensor:
    """The pretrained model's outputs (logits) on the target data, row i = sample index i (LwF's y_o).

    Run before training, with deterministic transforms. The model runs in eval mode under ``no_grad`` (its
    mode is restored). For an :class:`LwFClassifier` the source branch (``source_logits``) is used.

    Args:
        model: the pretrained classifier (or an :class:`LwFClassifier`).
        loader: yields ``x``, ``(x, y)`` or ``(x, y, index)``. Without indices the loader must not shuffle
            (its order is the index); with indices (see :class:`IndexedDataset`) any order works.
        device: where to run the model (default: the device of its first parameter).
        cache_dir: if given, the result is stored in ``cache_dir`` under a key hashing the model's state and
            the data, and reused by a rerun with the same model and data.
        data_key: a string that identifies the data, used in the cache key instead of hashing the data
            (which costs one pass over the loader without the model).

    Returns:
        float32 CPU tensor (N, C_s); N = number of samples.
    """
    if not isinstance(model, nn.Module):
        raise FineregTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    forward = inner.source_logits if isinstance(inner, LwFClassifier) else None

    def compute() -> dict:
        got = source_outputs(model, _refuse_shuffled_without_indices(loader), device=device, forward=forward)
        out = got.outputs.float()
        idx = got.indices if got.indices is not None else torch.arange(len(out))
        n = int(idx.max()) + 1
        if idx.min() < 0 or len(idx) != n or torch.bincount(idx, minlength=n).ne(1).any():
            raise FineregError(
                f"sample indices must cover 0..N-1 exactly once; got {len(idx)} samples with "
                f"indices in [{int(idx.min())}, {int(idx.max())}]"
            )
        table = torch.empty_like(out)
        table[idx] = out
        return {"predictions": table}

    key = None
    if cache_dir is not None:
        if data_key is not None and not isinstance(data_key, str):
            raise FineregTypeError("data_key must be a string")
        key = make_key(
            "lwf-source-predictions",
            module_fingerprint(model),
            data_key if data_key is not None else loader_fingerprint(loader),
        )
    return cached(cache_dir, "lwf-source", key or "", compute)["predictions"]
