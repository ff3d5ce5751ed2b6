"""Drop-in replacements for tllib's regularization classes.

Change one import line and keep the same hyper-parameters::

    # from tllib.regularization.delta import SPRegularization, BehavioralRegularization
    from finereg.compat.tllib import SPRegularization, BehavioralRegularization

Signatures, call conventions and return values are tllib's; the computations are finereg's.
"""
from ._tllib_weight import *  # noqa: F401,F403 -- L2Regularization, SPRegularization, BatchSpectralShrinkage
from ._tllib_feature import *  # noqa: F401,F403 -- Behavioral*, IntermediateLayerGetter, channel_attention
from ._tllib_head import *  # noqa: F401,F403 -- KD, LwF Classifier, Co-Tuning, Bi-Tuning
from . import _tllib_feature, _tllib_head, _tllib_weight

__all__ = [*_tllib_weight.__all__, *_tllib_feature.__all__, *_tllib_head.__all__]
