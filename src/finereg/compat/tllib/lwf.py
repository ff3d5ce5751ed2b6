"""``tllib.regularization.lwf``: the LwF classifier and ``collect_pretrain_labels``.

A star import gives every public name tllib's module gives (it has no ``__all__``): also ``Optional``, ``List``,
``Dict``, ``torch``, ``nn`` and ``tqdm`` (imported when first asked for: it is not a dependency of finereg's core).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional  # noqa: UP035 -- tllib's namespace

import torch
import torch.nn as nn

from ...head._source import source_outputs
from ...head.lwf import LwFClassifier
from ._classifier import default_pool, features_dim, get_parameters

__all__ = ["Optional", "List", "Dict", "torch", "nn", "tqdm", "collect_pretrain_labels", "Classifier"]  # noqa: F822


def __getattr__(name: str):
    if name == "tqdm":
        try:
            return importlib.import_module("tqdm")
        except ImportError as e:
            raise ImportError("finereg.compat.tllib.lwf.tqdm needs tqdm, as tllib does: pip install tqdm") from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def collect_pretrain_labels(data_loader, classifier: nn.Module, device) -> torch.Tensor:
    """tllib's ``collect_pretrain_labels(data_loader, classifier, device)``: the classifier's outputs over the
    loader (eval mode, ``no_grad``), in the loader's order, on the CPU."""
    return source_outputs(classifier, data_loader, device=device).outputs


class Classifier(LwFClassifier):
    """tllib's ``lwf.Classifier(backbone, num_classes, head_source, head_target=None, bottleneck=None,
    bottleneck_dim=-1, finetune=True, pool_layer=None)``.

    forward: f = pool_layer(backbone(x)); y_s = head_source(f); y_t = head_target(bottleneck(f)); training →
    (y_s, y_t), eval → y_t. Default pool: AdaptiveAvgPool2d(1) + Flatten; default target head
    Linear(features_dim, num_classes) with features_dim = bottleneck_dim or backbone.out_features.
    ``get_parameters(base_lr)``: backbone 0.1·base_lr (1.0 if not finetune), bottleneck and target head
    1.0·base_lr; the source head is not in the list (tllib leaves it out of the optimizer).
    """

    _source_head_role = "excluded"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head_source: nn.Module,
        head_target: nn.Module | None = None,
        bottleneck: nn.Module | None = None,
        bottleneck_dim: int | None = -1,
        finetune: bool = True,
        pool_layer: nn.Module | None = None,
    ):
        dim = features_dim(backbone, bottleneck, bottleneck_dim)
        super().__init__(
            backbone,
            head_source,
            num_classes,
            head_target=nn.Linear(dim, num_classes) if head_target is None else head_target,
            bottleneck=bottleneck,
            pool=default_pool() if pool_layer is None else pool_layer,
        )
        self._features_dim = dim
        self.finetune = finetune

    @property
    def features_dim(self) -> int:
        """The size of the features before the target head."""
        return self._features_dim

    def get_parameters(self, base_lr: float = 1.0) -> list[dict]:
        parts = {"backbone": "pretrained", "head_source": self._source_head_role}
        parts.update(bottleneck="new", head_target="new", pool_layer="excluded")
        return get_parameters(self, base_lr, parts)
