"""finereg for Keras 3: group penalties, exact partial freezing and weight standardization, in keras.ops.

Runs on every Keras backend (torch, JAX, TensorFlow); ``import finereg`` never imports this package (or
Keras). Install with ``pip install "finereg[keras]"`` and choose the backend as usual (``KERAS_BACKEND``).

* ``WeightGroup(layers_or_patterns, model=None, axis=0)`` — weights of several layers as one matrix, one row
  per output unit (as torch's ``finereg.WeightGroup``).
* ``Orthogonality(group, factor=0.01)`` (Keras's ``OrthogonalRegularizer``), ``SoftOrthogonality``,
  ``DoubleSoftOrthogonality``, ``MutualCoherence``, ``SRIP``, ``CallablePenalty(fn, group)`` — ``penalty()``
  is the value, ``penalty.attach()`` puts it into the model's losses once; ``bind(model)`` after loading.
* ``freeze(layer, "kernel", frozen)`` / ``unfreeze`` / ``frozen_mask`` — exact partial freezing through a
  constraint (``FrozenEntries``).
* ``StandardizedConv1D/2D/3D``, ``StandardizedDense`` (variants ``ws``, ``bit``, ``scaled``),
  ``standardize(model, variant)`` and ``bake(model)``.

Everything is registered for Keras serialization (``finereg>Name``) and saved in ``.keras`` files.
"""

try:
    import keras  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    if e.name == "tensorflow":
        raise ImportError(
            "finereg.keras: Keras's backend is TensorFlow (its default when KERAS_BACKEND is unset) and TensorFlow "
            "is not installed; set KERAS_BACKEND=torch (or jax) before importing keras"
        ) from e
    raise ImportError("finereg.keras needs Keras 3: pip install 'finereg[keras]'") from e

from .freeze import FrozenEntries, freeze, frozen_mask, unfreeze
from .groups import WeightGroup
from .orthogonal import (
    SRIP,
    CallablePenalty,
    DoubleSoftOrthogonality,
    MutualCoherence,
    Orthogonality,
    SoftOrthogonality,
)
from .penalty import GroupPenalty, PenaltyShare, bind
from .standardize import bake, standardize
from .standardized import (
    StandardizedConv1D,
    StandardizedConv2D,
    StandardizedConv3D,
    StandardizedDense,
    standardize_kernel,
)

__all__ = [
    "WeightGroup",
    "GroupPenalty",
    "Orthogonality",
    "SoftOrthogonality",
    "DoubleSoftOrthogonality",
    "MutualCoherence",
    "SRIP",
    "CallablePenalty",
    "PenaltyShare",
    "bind",
    "FrozenEntries",
    "freeze",
    "unfreeze",
    "frozen_mask",
    "StandardizedConv1D",
    "StandardizedConv2D",
    "StandardizedConv3D",
    "StandardizedDense",
    "standardize_kernel",
    "standardize",
    "bake",
]
