"""Drop-in replacements for tllib's regularization modules (``tllib.regularization``).

Change the package in the import lines and keep the same hyper-parameters::

    # from tllib.regularization.delta import *
    from finereg.compat.tllib.delta import *
    # from tllib.regularization.co_tuning import Classifier, CoTuningLoss, Relationship
    from finereg.compat.tllib.co_tuning import Classifier, CoTuningLoss, Relationship

One module per tllib module: ``delta``, ``bss``, ``knowledge_distillation``, ``lwf``, ``co_tuning``, ``bi_tuning``;
a star import of each gives every public name tllib's gives. Signatures, call conventions (argument names
included) and return values are tllib's; the computations are finereg's. This package holds what
``tllib.regularization`` holds after its own star imports (so ``Classifier`` is Bi-Tuning's, as in tllib), plus
the three classifiers under distinct names: ``LwFClassifier``, ``CoTuningClassifier``, ``BiTuningClassifier``.
"""

import functools  # noqa: F401 -- the names tllib.regularization holds after its star imports
from collections import OrderedDict  # noqa: F401

import torch  # noqa: F401
import torch.nn as nn  # noqa: F401
import torch.nn.functional as F  # noqa: F401
from torch.nn.functional import normalize  # noqa: F401

from . import bi_tuning, bss, co_tuning, delta, knowledge_distillation, lwf
from .bi_tuning import BiTuning, ClassifierBase
from .bi_tuning import Classifier as BiTuningClassifier
from .bss import BatchSpectralShrinkage
from .co_tuning import Classifier as CoTuningClassifier
from .co_tuning import CoTuningLoss, Relationship
from .delta import (
    AttentionBehavioralRegularization,
    BehavioralRegularization,
    IntermediateLayerGetter,
    L2Regularization,
    SPRegularization,
    calculate_channel_attention,
    get_attribute,
)
from .knowledge_distillation import KnowledgeDistillationLoss
from .lwf import Classifier as LwFClassifier

Classifier = BiTuningClassifier  # tllib.regularization.Classifier: its star imports end with bi_tuning's

__all__ = [
    "bss",
    "co_tuning",
    "delta",
    "bi_tuning",
    "knowledge_distillation",
    "lwf",
    "BatchSpectralShrinkage",
    "Classifier",
    "CoTuningLoss",
    "Relationship",
    "L2Regularization",
    "SPRegularization",
    "BehavioralRegularization",
    "AttentionBehavioralRegularization",
    "IntermediateLayerGetter",
    "get_attribute",
    "calculate_channel_attention",
    "ClassifierBase",
    "BiTuning",
    "KnowledgeDistillationLoss",
    "LwFClassifier",
    "CoTuningClassifier",
    "BiTuningClassifier",
]
