"""tllib-compatible names for finereg's head regularizers (re-exported by finereg.compat.tllib).

Same constructor signatures, call conventions, outputs and parameter/buffer names as
``tllib.regularization.knowledge_distillation``, ``.lwf``, ``.co_tuning`` and ``.bi_tuning``; the computations
are finereg's (:mod:`finereg.head`). tllib has a class ``Classifier`` in each of lwf, co_tuning and bi_tuning;
they are exported as ``LwFClassifier``, ``CoTuningClassifier`` and ``BiTuningClassifier``, and the submodules
``finereg.compat.tllib.lwf``, ``.co_tuning``, ``.bi_tuning`` and ``.knowledge_distillation`` mirror tllib's::

    from finereg.compat.tllib import bi_tuning, co_tuning, lwf
    encoder_q = bi_tuning.Classifier(backbone, num_classes, projection_dim=128)
    relationship = co_tuning.Relationship(loader, source_classifier, device, cache="rel.npy")

Where this differs from tllib (deliberately):

* ``Relationship``: a target class without samples raises an error (tllib silently produces a NaN row); the
  cache is written atomically at exactly the given path (tllib's ``np.save`` appends ``.npy`` to a path
  without that suffix, so such a cache was never found again and was recomputed on every run); the relationship
  is computed in one vectorized pass; no progress bar/print.
* ``BiTuning``: no Python loop over samples, any batch size, keys of all DDP ranks enter the queues.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import atomic_write
from ..head._source import source_outputs
from ..head.bi_tuning import BiTuning as _BiTuning
from ..head.bi_tuning import BiTuningClassifier as _BiTuningClassifier
from ..head.co_tuning import CoTuningLoss as _CoTuningLoss
from ..head.co_tuning import collect_source_outputs, direct_relationship
from ..head.kd import KnowledgeDistillation
from ..head.lwf import LwFClassifier as _LwFClassifier
from ..lr_policy import param_groups

__all__ = [
    "KnowledgeDistillationLoss",
    "LwFClassifier",
    "CoTuningClassifier",
    "CoTuningLoss",
    "Relationship",
    "BiTuningClassifier",
    "BiTuning",
    "collect_pretrain_labels",
]


def _default_pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(1, 1)), nn.Flatten())


def _features_dim(backbone: nn.Module, bottleneck: nn.Module | None, bottleneck_dim: int | None) -> int:
    if bottleneck is not None:
        if not (isinstance(bottleneck_dim, int) and bottleneck_dim > 0):
            raise ValueError("a bottleneck needs bottleneck_dim > 0 (its output size)")
        return bottleneck_dim
    dim = getattr(backbone, "out_features", None)
    if not isinstance(dim, int):
        raise ValueError("the backbone needs an int attribute out_features (tllib's convention) to size the heads")
    return dim


def _tllib_groups(model: nn.Module, base_lr: float, parts: dict) -> list[dict]:
    """tllib's ``get_parameters(base_lr)``: :func:`finereg.lr_policy.param_groups` with pretrained parts at
    0.1·base_lr when ``model.finetune`` (else 1.0·base_lr), as ``[{"params", "lr"}]`` dicts."""
    groups = param_groups(model, base_lr, parts, pretrained_lr_mult=0.1 if model.finetune else 1.0)
    return [{"params": g["params"], "lr": g["lr"]} for g in groups]


class KnowledgeDistillationLoss(KnowledgeDistillation):
    """tllib's ``KnowledgeDistillationLoss(T=1., reduction='batchmean')``:
    KLDiv(reduction)(log_softmax(y_student / T), softmax(y_teacher / T)), no T² factor."""

    def __init__(self, T: float = 1.0, reduction: str = "batchmean"):
        super().__init__(T=T, reduction=reduction)

    def forward(self, y_student: Tensor, y_teacher: Tensor) -> Tensor:  # tllib's argument names
        return super().forward(y_student, y_teacher)


class LwFClassifier(_LwFClassifier):
    """tllib's ``lwf.Classifier(backbone, num_classes, head_source, head_target=None, bottleneck=None,
    bottleneck_dim=-1, finetune=True, pool_layer=None)``.

    forward: f = pool_layer(backbone(x)); y_s = head_source(f); y_t = head_target(bottleneck(f)); training →
    (y_s, y_t), eval → y_t. Default pool: AdaptiveAvgPool2d(1) + Flatten; default target head
    Linear(features_dim, num_classes) with features_dim = bottleneck_dim or backbone.out_features.
    ``get_parameters(base_lr)``: backbone 0.1·base_lr (1.0 if not finetune), bottleneck and target head
    1.0·base_lr; the source head is not in the list (tllib leaves it out of the optimizer).
    """

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
        features_dim = _features_dim(backbone, bottleneck, bottleneck_dim)
        if head_target is None:
            head_target = nn.Linear(features_dim, num_classes)
        super().__init__(
            backbone,
            head_source,
            num_classes,
            head_target=head_target,
            bottleneck=bottleneck,
            pool=_default_pool() if pool_layer is None else pool_layer,
        )
        self._features_dim = features_dim
        self.finetune = finetune

    @property
    def features_dim(self) -> int:
        return self._features_dim

    _source_head_role = "excluded"

    def get_parameters(self, base_lr: float = 1.0) -> list[dict]:
        parts = {"backbone": "pretrained", "head_source": self._source_head_role}
        parts.update(bottleneck="new", head_target="new", pool_layer="excluded")
        return _tllib_groups(self, base_lr, parts)


class CoTuningClassifier(LwFClassifier):
    """tllib's ``co_tuning.Classifier``: the LwF classifier whose ``get_parameters`` also trains the source
    head (0.1·base_lr when fine-tuning)."""

    _source_head_role = "pretrained"


def collect_pretrain_labels(data_loader, classifier: nn.Module, device) -> torch.Tensor:
    """tllib's ``lwf.collect_pretrain_labels``: the classifier's outputs over the loader (eval mode, no_grad), in
    order, on the CPU."""
    return source_outputs(classifier, data_loader, device=device).outputs


class CoTuningLoss(_CoTuningLoss):
    """tllib's ``CoTuningLoss()(input, target)`` = mean over the batch of −Σ target · log_softmax(input)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 -- tllib's argument names
        return super().forward(input, target)


class Relationship:
    """tllib's ``co_tuning.Relationship(data_loader, classifier, device, cache=None)``: the direct category
    relationship p(y_s | y_t) as a numpy array ``relationship`` (N_t, N_p); ``rel[category]`` gives rows.

    If ``cache`` names an existing file it is loaded (``np.load``); otherwise the relationship is computed from
    ``softmax(classifier(x))`` over the loader (eval mode, no_grad) and, if ``cache`` is given, saved there.
    """

    def __init__(self, data_loader, classifier: nn.Module, device, cache: str | None = None):
        import numpy as np

        self.data_loader = data_loader
        self.classifier = classifier
        self.device = device
        if cache is None or not os.path.exists(cache):
            source_predictions, target_labels = self.collect_labels()
            self.relationship = self.get_category_relationship(source_predictions, target_labels)
            if cache is not None:
                _atomic_np_save(cache, self.relationship)
        else:
            self.relationship = np.load(cache)

    def __getitem__(self, category):
        return self.relationship[category]

    def collect_labels(self):
        """(source probabilities (N, N_p), target labels (N,)) as numpy arrays."""
        logits, labels = collect_source_outputs(self.classifier, self.data_loader, self.device)
        return F.softmax(logits, dim=1).numpy(), labels.numpy()

    def get_category_relationship(self, source_probabilities, target_labels):
        """Row i = mean of the source probabilities over the samples of target class i (N_t = max label + 1)."""
        rel = direct_relationship(torch.as_tensor(source_probabilities), torch.as_tensor(target_labels))
        return rel.numpy()


def _atomic_np_save(path: str, array) -> None:
    import numpy as np

    atomic_write(path, lambda f: np.save(f, array))


class BiTuningClassifier(_BiTuningClassifier):
    """tllib's ``bi_tuning.Classifier(backbone, num_classes, projection_dim=128, finetune=True,
    pool_layer=None)``: training → (y, z, hn), eval → y. Default pool: AdaptiveAvgPool2d(1) + Flatten;
    features_dim = backbone.out_features. ``get_parameters(base_lr)``: backbone and projector 0.1·base_lr
    (1.0 if not finetune), bottleneck and head 1.0·base_lr."""

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
            features_dim=_features_dim(backbone, None, None),
            pool=_default_pool() if pool_layer is None else pool_layer,
        )
        self.finetune = finetune

    def get_parameters(self, base_lr: float = 1.0) -> list[dict]:
        parts = {"backbone": "pretrained", "bottleneck": "new", "head": "new", "projector": "pretrained"}
        return _tllib_groups(self, base_lr, {**parts, "pool_layer": "excluded"})


class BiTuning(_BiTuning):
    """tllib's ``BiTuning(encoder_q, encoder_k, num_classes, K=40, m=0.999, T=0.07)``; forward(im_q, im_k,
    labels) → (y_q, logits_z, logits_y, labels_c). Buffers ``queue_h`` (F+1, C, K), ``queue_z`` (P, C, K),
    ``queue_ptr`` (C,) as in tllib."""

    def __init__(
        self,
        encoder_q: nn.Module,
        encoder_k: nn.Module,
        num_classes: int,
        K: int = 40,
        m: float = 0.999,
        T: float = 0.07,
    ):
        super().__init__(encoder_q, encoder_k, num_classes, K=K, m=m, T=T)
