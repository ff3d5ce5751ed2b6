"""``tllib.regularization.bss``: Batch Spectral Shrinkage."""

from .._tllib_weight import BatchSpectralShrinkage

__all__ = ["BatchSpectralShrinkage"]
