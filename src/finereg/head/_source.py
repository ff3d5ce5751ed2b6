"""The pretrained (source) classifier: splitting it into backbone and head, and running it over the target data.

Classifier split. The *head* of a pretrained classifier is its final ``nn.Linear``, the layer that maps features
to the source classes and is replaced for a new label set; every layer before it (VGG's fc6/fc7 MLP, ConvNeXt's
final LayerNorm, MaxViT's pre-logits) keeps its pretrained weights in the backbone. The head is timm's
``pretrained_cfg["classifier"]`` where that names an ``nn.Linear`` (what ``get_classifier()`` returns), else the
last ``nn.Linear`` of ``model.named_modules()``; :func:`split_classifier` replaces it with ``nn.Identity``, so the
backbone returns exactly the features the head reads:

    model(x) == head(backbone(x))

Source outputs. :func:`source_outputs` runs a model over batches in eval mode under ``no_grad`` (the mode is
restored) and gathers its outputs on the CPU with the batches' labels and sample indices: LwF's recorded
predictions y_o and Co-Tuning's relationship are computed from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError
from .._utils import get_submodule, unwrap

__all__ = [
    "SourceOutputs",
    "source_outputs",
    "collect_source_outputs",
    "batch_parts",
    "classifier_name",
    "split_classifier",
]


# ---------------------------------------------------------------------------------------------- source outputs
@dataclass
class SourceOutputs:
    """What :func:`source_outputs` collected, in the order of the batches (all on the CPU)."""

    outputs: Tensor  # (N, ...) the model's outputs, in its dtype
    labels: Tensor | None  # (N,) int64, or None when the batches carry no labels
    indices: Tensor | None  # (N,) int64 sample indices, or None when the batches carry none


def batch_parts(batch: Any, i: int = 0) -> tuple[Tensor, Any, Tensor | None]:
    """``(inputs, labels, indices)`` of a batch ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, index, ...)``; the missing
    parts are None. Indices must be a 1-D integer tensor (see :class:`~finereg.head.lwf.IndexedDataset`)."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if not (isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor)):
        raise FineregTypeError(
            f"batch {i} must be a tensor of inputs or a tuple (inputs, labels[, indices]), got {type(batch).__name__}"
        )
    labels = batch[1] if len(batch) >= 2 else None
    idx = None
    if len(batch) >= 3:
        idx = torch.as_tensor(batch[2])
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool or idx.dim() != 1:
            raise FineregError(
                f"the third item of batch {i} must be the 1-D integer sample indices (see IndexedDataset), "
                f"got {idx.dtype} of shape {tuple(idx.shape)}"
            )
    return batch[0], labels, idx


@torch.no_grad()
def source_outputs(
    model: nn.Module,
    batches: Iterable,
    *,
    device: torch.device | str | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> SourceOutputs:
    """``forward(x)`` (default ``model(x)``) over every batch, with ``model`` in eval mode under ``no_grad``.

    Args:
        model: the pretrained classifier; put in eval mode for the pass, its mode restored afterwards.
        batches: an iterable of batches (see :func:`batch_parts`), e.g. a DataLoader with deterministic transforms.
        device: where the inputs go (default: the device of the model's first parameter, else the CPU).
        forward: what to run on the inputs instead of ``model`` (e.g. a source branch of it).

    Returns:
        :class:`SourceOutputs`; labels (indices) are None unless every batch carries them.
    """
    if not isinstance(model, nn.Module):
        raise FineregTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    run = model if forward is None else forward
    outs: list[Tensor] = []
    labels: list[Tensor] | None = []
    idxs: list[Tensor] | None = []
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            x, y, idx = batch_parts(batch, i)
            out = run(x.to(device))
            if not isinstance(out, Tensor):
                raise FineregTypeError(
                    f"the source model must return a tensor of outputs in eval mode, got {type(out).__name__}"
                )
            outs.append(out.detach().cpu())
            labels = None if labels is None or y is None else [*labels, torch.as_tensor(y).cpu().long()]
            idxs = None if idxs is None or idx is None else [*idxs, idx.cpu().long()]
    finally:
        model.train(was_training)
    if not outs:
        raise FineregError("the data loader yielded no batches; give it a non-empty dataset")
    return SourceOutputs(torch.cat(outs), torch.cat(labels) if labels else None, torch.cat(idxs) if idxs else None)


def collect_source_outputs(
    model: nn.Module, loader: Iterable, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """The pretrained (source) classifier's logits and the target labels over a loader of ``(x, y, ...)``
    batches (:func:`~finereg.head._source.source_outputs`: eval mode, ``no_grad``, mode restored). Returns the
    (N, N_s) CPU logits in the model's dtype and the (N,) int64 labels."""
    got = source_outputs(model, loader, device=device)
    if got.labels is None:
        raise FineregTypeError("the loader must yield (inputs, labels, ...) batches: the relationship needs labels")
    if got.outputs.dim() != 2:
        raise FineregError(
            f"the source classifier must return (batch, N_s) logits in eval mode, got shape {tuple(got.outputs.shape)}"
        )
    return got.outputs, got.labels


# -------------------------------------------------------------------------------------------- classifier split
def classifier_name(model: nn.Module) -> str:
    """The name of ``model``'s final classifier ``nn.Linear`` (module docstring): timm's
    ``pretrained_cfg["classifier"]`` where it names a Linear, else the last ``nn.Linear`` among the modules."""
    model = unwrap(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            if isinstance(model.get_submodule(name), nn.Linear):
                return name
        except AttributeError:
            pass
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FineregError(
            f"{type(model).__name__} has no nn.Linear classifier head to split off; build the backbone and the "
            "head yourself (e.g. LwFClassifier(backbone, head_source, num_classes))"
        )
    return linears[-1]


def split_classifier(model: nn.Module, name: str | None = None) -> tuple[nn.Module, nn.Linear, str]:
    """Replace ``model``'s classifier head (``name``, default :func:`classifier_name`) by ``nn.Identity``, in
    place; returns ``(model, head, name)``: ``model`` is now the backbone, ``model_before(x) == head(model(x))``."""
    root = unwrap(model)
    name = classifier_name(root) if name is None else name
    head = get_submodule(root, name)
    if name == "":
        raise FineregError("the whole model cannot be its own head; pass the name of the head submodule")
    parent, _, leaf = name.rpartition(".")
    setattr(get_submodule(root, parent) if parent else root, leaf, nn.Identity())
    return model, head, name
