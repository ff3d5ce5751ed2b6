"""``tllib.regularization.lwf``: the LwF classifier and ``collect_pretrain_labels``."""

from .._tllib_head import LwFClassifier as Classifier
from .._tllib_head import collect_pretrain_labels

__all__ = ["Classifier", "collect_pretrain_labels"]
