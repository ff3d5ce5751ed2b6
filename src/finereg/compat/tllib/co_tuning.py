"""``tllib.regularization.co_tuning``: the classifier, ``CoTuningLoss`` and ``Relationship``."""

from .._tllib_head import CoTuningClassifier as Classifier
from .._tllib_head import CoTuningLoss, Relationship

__all__ = ["Classifier", "CoTuningLoss", "Relationship"]
