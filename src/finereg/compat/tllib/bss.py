"""``tllib.regularization.bss``: Batch Spectral Shrinkage, a penalty on the batch features
(:mod:`finereg.feature.bss`). tllib's ``__all__``: ``BatchSpectralShrinkage``."""

from torch import Tensor

from ...feature.bss import BSS

__all__ = ["BatchSpectralShrinkage"]


class BatchSpectralShrinkage(BSS):
    r"""tllib's ``BatchSpectralShrinkage(k=1)``: ``bss(feature)`` = Σ of the k smallest σ² of ``feature`` (b×d)."""

    def __init__(self, k: int = 1):
        super().__init__(k=k)

    def forward(self, feature: Tensor) -> Tensor:  # tllib's argument name
        return super().forward(feature)
