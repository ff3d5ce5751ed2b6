"""``tllib.regularization.bi_tuning``: the classifier and ``BiTuning``."""

from .._tllib_head import BiTuning
from .._tllib_head import BiTuningClassifier as Classifier

__all__ = ["Classifier", "BiTuning"]
