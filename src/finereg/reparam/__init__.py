"""Reparameterizations: weight standardization, partial freezing, BatchNorm → GroupNorm."""

from ._report import ConversionReport
from .freeze import PartialFreeze, freeze, frozen_mask, unfreeze
from .norm import batchnorm_to_groupnorm
from .standardize import VARIANTS, WeightStandardization, bake, standardize

__all__ = [
    "freeze",
    "unfreeze",
    "frozen_mask",
    "PartialFreeze",
    "standardize",
    "bake",
    "WeightStandardization",
    "ConversionReport",
    "VARIANTS",
    "batchnorm_to_groupnorm",
]
