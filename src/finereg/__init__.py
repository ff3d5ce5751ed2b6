"""finereg: regularized fine-tuning and weight-structure constraints for PyTorch.

The user-facing names live here (README, Conventions): the four families of regularizers, the learning-rate
policy, the robust fine-tuning methods (optimizer wrappers, weight space, LP-FT) and ``create_model``; helpers
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
from .lp_ft import LinearProbe, batchnorm_eval_, fit_linear_probe
from .lr_policy import param_groups
from .merge import TPGM, fisher_diagonal, greedy_soup, uniform_soup, wise_ft, wise_ft_sweep
from .models import create_model
from .optim import FTP, SPD, DecoupledL2SP
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

__version__ = "0.2.0.dev0"  # as pyproject.toml; pre-1.0 (CHANGELOG.md)
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
    # robust fine-tuning: optimizer wrappers, weight space, LP-FT
    "SPD",
    "FTP",
    "DecoupledL2SP",
    "TPGM",
    "wise_ft",
    "wise_ft_sweep",
    "fisher_diagonal",
    "uniform_soup",
    "greedy_soup",
    "fit_linear_probe",
    "LinearProbe",
    "batchnorm_eval_",
    # networks (timm / torchvision names; packaged ImageNet weights offline)
    "create_model",
]
