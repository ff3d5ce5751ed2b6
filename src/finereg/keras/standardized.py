"""Weight-standardized Keras layers: ``StandardizedConv1D/2D/3D`` and ``StandardizedDense``.

Each output unit's kernel is standardized over its fan-in on every call, with the formulas of
``finereg.standardize`` (same variants, same eps, same outputs on the same weights):

    "ws"      Ŵ = (W − μ) / (σ_unbiased + eps)                              eps = 1e-5   (Qiao et al. 2019)
    "bit"     Ŵ = (W − μ) / √(σ²_biased + eps)                              eps = 1e-6   (BiT; timm StdConv2d)
    "scaled"  Ŵ = gain · γ/√fan_in · (W − μ) / √(σ²_biased + eps)           eps = 1e-6   (NF-Nets; timm ScaledStdConv2d)

A Keras kernel has shape (k..., in/groups, filters) (Conv) or (in, units) (Dense): the units are the last
axis, μ and σ are taken over all the other axes, fan_in = ∏ of them. ``gain`` is a trainable weight (one per
unit, initialised to ``gain_init``) of the "scaled" variant. The variable ``_kernel`` stays the trained
quantity (what a regularizer, ``finereg.keras.freeze`` and a ``WeightGroup`` see); ``layer.kernel`` is Ŵ
(as with Keras's LoRA, where ``kernel`` is the effective kernel). Low-precision kernels are standardized in
float32. Written with keras.ops only.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from .._checks import FineregError, check_choice, check_number
from ..reparam.standardize import VARIANTS

__all__ = [
    "standardize_kernel",
    "StandardizedConv1D",
    "StandardizedConv2D",
    "StandardizedConv3D",
    "StandardizedDense",
    "STANDARDIZED_LAYERS",
]

_TINY32 = 1.1754943508222875e-38  # float32 tiny: a constant unit keeps a finite gradient under "ws"


def standardize_kernel(kernel, variant: str = "ws", eps: float | None = None, gain=None, gamma: float = 1.0):
    """Ŵ of a Keras kernel (units on the last axis), per unit over all other axes (see the module docstring)."""
    check_choice(variant, "variant", tuple(VARIANTS))
    eps = VARIANTS[variant] if eps is None else eps
    kernel = ops.convert_to_tensor(kernel)
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    x = ops.cast(kernel, "float32") if dtype in ("float16", "bfloat16") else kernel
    axes = tuple(range(len(x.shape) - 1))
    n = math.prod(x.shape[:-1])
    c = x - ops.mean(x, axis=axes, keepdims=True)
    ss = ops.sum(c * c, axis=axes, keepdims=True)
    if variant == "ws":
        out = c / (ops.sqrt(ops.maximum(ss, _TINY32) / (n - 1)) + eps)
    else:
        out = c * ops.rsqrt(ss / n + eps)
        if variant == "scaled":
            out = out * (ops.cast(gain, out.dtype) * (gamma / math.sqrt(n)))
    return ops.cast(out, dtype) if dtype in ("float16", "bfloat16") else out


class _Standardized:
    """Mixin: ``kernel`` returns Ŵ of the stored kernel; the "scaled" variant adds a per-unit ``gain``."""

    def _setup_ws(self, variant: str, eps: float | None, gamma: float, gain_init: float) -> None:
        self.variant = check_choice(variant, "variant", tuple(VARIANTS))
        self.eps = VARIANTS[variant] if eps is None else check_number(eps, "eps", low=0, low_open=True)
        self.gamma = check_number(gamma, "gamma")
        self.gain_init = check_number(gain_init, "gain_init")
        self.gain = None

    def build(self, input_shape):
        super().build(input_shape)
        raw = super().kernel
        if math.prod(raw.shape[:-1]) < 2:
            raise FineregError(
                f"{self.name}: a kernel of shape {tuple(raw.shape)} has a fan-in of 1; standardizing one weight per "
                "unit gives 0 (or NaN for 'ws'): use a plain layer here"
            )
        if self.variant == "scaled":
            self.gain = self.add_weight(
                name="gain", shape=(raw.shape[-1],), initializer=keras.initializers.Constant(self.gain_init)
            )

    @property
    def kernel(self):
        return standardize_kernel(super().kernel, self.variant, self.eps, self.gain, self.gamma)

    # Conv/Dense save ``self.kernel`` (the effective kernel, for LoRA) and only kernel and bias: here that would
    # write Ŵ in place of the trained kernel and lose the gain. Save every variable as a plain Layer does.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def get_config(self):
        ws = {"variant": self.variant, "eps": self.eps, "gamma": self.gamma, "gain_init": self.gain_init}
        return {**super().get_config(), **ws}


@keras.saving.register_keras_serializable(package="finereg")
class StandardizedConv1D(_Standardized, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with a weight-standardized kernel (``variant`` "ws", "bit" or "scaled")."""

    def __init__(self, filters, kernel_size, variant="ws", eps=None, gamma=1.0, gain_init=1.0, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._setup_ws(variant, eps, gamma, gain_init)


@keras.saving.register_keras_serializable(package="finereg")
class StandardizedConv2D(_Standardized, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with a weight-standardized kernel (``variant`` "ws", "bit" or "scaled")."""

    def __init__(self, filters, kernel_size, variant="ws", eps=None, gamma=1.0, gain_init=1.0, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._setup_ws(variant, eps, gamma, gain_init)


@keras.saving.register_keras_serializable(package="finereg")
class StandardizedConv3D(_Standardized, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` with a weight-standardized kernel (``variant`` "ws", "bit" or "scaled")."""

    def __init__(self, filters, kernel_size, variant="ws", eps=None, gamma=1.0, gain_init=1.0, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._setup_ws(variant, eps, gamma, gain_init)


@keras.saving.register_keras_serializable(package="finereg")
class StandardizedDense(_Standardized, keras.layers.Dense):
    """``keras.layers.Dense`` with a weight-standardized kernel (each unit over its inputs)."""

    def __init__(self, units, variant="ws", eps=None, gamma=1.0, gain_init=1.0, **kwargs):
        super().__init__(units, **kwargs)
        self._setup_ws(variant, eps, gamma, gain_init)


#: plain Keras layer class -> its standardized counterpart (exact classes; subclasses are left alone)
STANDARDIZED_LAYERS: dict[type, type] = {
    keras.layers.Conv1D: StandardizedConv1D,
    keras.layers.Conv2D: StandardizedConv2D,
    keras.layers.Conv3D: StandardizedConv3D,
    keras.layers.Dense: StandardizedDense,
}
