"""Head losses: knowledge distillation, LwF, Co-Tuning, Bi-Tuning."""

from .bi_tuning import BiTuning, BiTuningClassifier, bi_tuning_loss
from .co_tuning import (
    CategoryRelationship,
    CoTuning,
    CoTuningLoss,
    ReverseFit,
    co_tuning_loss,
    collect_source_outputs,
    direct_relationship,
    reverse_relationship,
)
from .kd import KnowledgeDistillation, kd_loss
from .lwf import IndexedDataset, LwFClassifier, new_head_like, record_source_predictions

__all__ = [
    "kd_loss",
    "KnowledgeDistillation",
    "LwFClassifier",
    "new_head_like",
    "record_source_predictions",
    "IndexedDataset",
    "co_tuning_loss",
    "CoTuningLoss",
    "direct_relationship",
    "reverse_relationship",
    "ReverseFit",
    "collect_source_outputs",
    "CategoryRelationship",
    "CoTuning",
    "BiTuningClassifier",
    "BiTuning",
    "bi_tuning_loss",
]
