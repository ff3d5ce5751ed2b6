"""Drop-in replacements for tllib's regularization classes (``tllib.regularization``).

Change one import line and keep the same hyper-parameters::

    # from tllib.regularization.delta import SPRegularization, BehavioralRegularization
    from finereg.compat.tllib.delta import SPRegularization, BehavioralRegularization
    # from tllib.regularization.co_tuning import Classifier, CoTuningLoss, Relationship
    from finereg.compat.tllib.co_tuning import Classifier, CoTuningLoss, Relationship

The submodules mirror tllib's (``delta``, ``bss``, ``knowledge_distillation``, ``lwf``, ``co_tuning``,
``bi_tuning``); every name is also importable from this package, the three ``Classifier`` classes as
``LwFClassifier``, ``CoTuningClassifier`` and ``BiTuningClassifier``. Signatures, call conventions (argument
names included) and return values are tllib's; the computations are finereg's.
"""

from .. import _tllib_feature, _tllib_head, _tllib_weight
from .._tllib_feature import *  # noqa: F401,F403 -- Behavioral*, IntermediateLayerGetter, channel_attention
from .._tllib_head import *  # noqa: F401,F403 -- KD, LwF Classifier, Co-Tuning, Bi-Tuning
from .._tllib_weight import *  # noqa: F401,F403 -- L2Regularization, SPRegularization, BatchSpectralShrinkage
from . import bi_tuning, bss, co_tuning, delta, knowledge_distillation, lwf

__all__ = [
    *_tllib_weight.__all__,
    *_tllib_feature.__all__,
    *_tllib_head.__all__,
    "delta",
    "bss",
    "knowledge_distillation",
    "lwf",
    "co_tuning",
    "bi_tuning",
]
