"""``tllib.regularization.bi_tuning``: the classifier and ``BiTuning``.

A star import gives every public name tllib's module gives (it has no ``__all__``): also ``torch``, ``nn``,
``normalize`` and ``ClassifierBase`` (tllib's generic classifier, ``tllib.modules.classifier.Classifier``).
The computation is finereg's (:mod:`finereg.head.bi_tuning`: no loop over samples, any batch size, the keys of all
DDP ranks enter the queues).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.functional import normalize

from ...head.bi_tuning import BiTuning as _BiTuning
from ...head.bi_tuning import BiTuningClassifier
from ._classifier import Classifier as ClassifierBase
from ._classifier import default_pool, features_dim, get_parameters

__all__ = ["torch", "nn", "normalize", "ClassifierBase", "Classifier", "BiTuning"]


class Classifier(BiTuningClassifier):
    """tllib's ``bi_tuning.Classifier(backbone, num_classes, projection_dim=128, finetune=True, pool_layer=None)``:
    training → (y, z, hn), eval → y. Default pool: AdaptiveAvgPool2d(1) + Flatten; features_dim =
    backbone.out_features. ``get_parameters(base_lr)``: backbone and projector 0.1·base_lr (1.0 if not
    finetune), bottleneck and head 1.0·base_lr."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        projection_dim: int = 128,
        finetune: bool = True,
        pool_layer: nn.Module | None = None,
    ):
        super().__init__(
            backbone,
            num_classes,
            projection_dim,
            features_dim=features_dim(backbone, None, None),
            pool=default_pool() if pool_layer is None else pool_layer,
        )
        self.finetune = finetune

    def get_parameters(self, base_lr: float = 1.0) -> list[dict]:
        parts = {"backbone": "pretrained", "bottleneck": "new", "head": "new", "projector": "pretrained"}
        return get_parameters(self, base_lr, {**parts, "pool_layer": "excluded"})


class BiTuning(_BiTuning):
    """tllib's ``BiTuning(encoder_q, encoder_k, num_classes, K=40, m=0.999, T=0.07)``; forward(im_q, im_k,
    labels) → (y_q, logits_z, logits_y, labels_c). Buffers ``queue_h`` (F+1, C, K), ``queue_z`` (P, C, K),
    ``queue_ptr`` (C,) as in tllib."""

    def __init__(
        self,
        encoder_q: nn.Module,
        encoder_k: nn.Module,
        num_classes: int,
        K: int = 40,  # noqa: N803 -- tllib's argument names
        m: float = 0.999,
        T: float = 0.07,  # noqa: N803
    ):
        super().__init__(encoder_q, encoder_k, num_classes, K=K, m=m, temperature=T)

    @property
    def T(self) -> float:  # noqa: N802 -- tllib's attribute
        return self.temperature
