"""``tllib.regularization.delta``: L2, L2-SP, DELTA's behavioral regularizers and the layer getter."""

from .._tllib_feature import AttentionBehavioralRegularization, BehavioralRegularization, IntermediateLayerGetter
from .._tllib_weight import L2Regularization, SPRegularization

__all__ = [
    "L2Regularization",
    "SPRegularization",
    "BehavioralRegularization",
    "AttentionBehavioralRegularization",
    "IntermediateLayerGetter",
]
