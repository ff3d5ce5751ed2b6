"""finereg: regularized fine-tuning and weight-structure constraints for PyTorch.

The user-facing names of the four families and the learning-rate policy live here (README, Conventions); helpers
stay importable from their modules (``finereg.weight.l2.canonical_name``, ``finereg.head.lwf.IndexedDataset``,
``finereg.reparam.standardize.VARIANTS`` ...). The engine is :mod:`finereg.train`, the drop-in replacements for tllib
and Keras are :mod:`finereg.compat.tllib` and :mod:`finereg.compat.keras`.
"""

from .feature import (
    BSS,
    AttentionBehavioralPenalty,
    BehavioralPenalty,
    FeatureCapture,
    attention_behavioral_penalty,
    batch_spectral_shrinkage,
    behavioral_penalty,
    channel_attention,
    channel_importance,
    train_attention_classifier,
)
from .head import (
    BiTuning,
    BiTuningClassifier,
    CategoryRelationship,
    CoTuning,
    CoTuningLoss,
    KnowledgeDistillation,
    LwFClassifier,
    bi_tuning_loss,
    co_tuning_loss,
    direct_relationship,
    kd_loss,
    record_source_predictions,
    reverse_relationship,
)
from .lr_policy import param_groups
from .reparam import WeightStandardization, bake, batchnorm_to_groupnorm, freeze, frozen_mask, standardize, unfreeze
from .weight import (
    L2,
    L2SP,
    SRIP,
    CallablePenalty,
    DoubleSoftOrthogonality,
    MutualCoherence,
    Orthogonality,
    SoftOrthogonality,
    WeightGroup,
)

__version__ = "0.1.0"
__all__ = [
    # weight penalties
    "L2",
    "L2SP",
    "WeightGroup",
    "Orthogonality",
    "SoftOrthogonality",
    "DoubleSoftOrthogonality",
    "MutualCoherence",
    "SRIP",
    "CallablePenalty",
    # feature penalties
    "FeatureCapture",
    "behavioral_penalty",
    "attention_behavioral_penalty",
    "BehavioralPenalty",
    "AttentionBehavioralPenalty",
    "channel_importance",
    "channel_attention",
    "train_attention_classifier",
    "BSS",
    "batch_spectral_shrinkage",
    # head losses
    "kd_loss",
    "KnowledgeDistillation",
    "LwFClassifier",
    "record_source_predictions",
    "co_tuning_loss",
    "CoTuningLoss",
    "CoTuning",
    "CategoryRelationship",
    "direct_relationship",
    "reverse_relationship",
    "BiTuningClassifier",
    "BiTuning",
    "bi_tuning_loss",
    # reparameterizations
    "freeze",
    "unfreeze",
    "frozen_mask",
    "standardize",
    "bake",
    "WeightStandardization",
    "batchnorm_to_groupnorm",
    # learning-rate policy
    "param_groups",
]
