"""The orthogonality family for Keras weight groups, in keras.ops (torch, JAX and TensorFlow backends).

For a group matrix W of shape n × m (n output units as rows, m the fan-in; see ``finereg.keras.WeightGroup``),
the values equal those of finereg's torch penalties on the same weights:

* :class:`Orthogonality` — Keras 3's ``OrthogonalRegularizer``: ŵ_i = w_i / max(‖w_i‖, 1e-7),
  value = ½ Σ_{i≠j} |ŵ_i·ŵ_j| / (n(n−1)/2), the mean |cosine| between distinct rows (``mode="rows"``, the
  filters) or columns (``mode="columns"``). Keras's ``mode`` names a side of the *kernel* (fan-in, units):
  Keras ``mode="columns"`` on the kernels reshaped to (fan-in, filters) and put side by side is
  ``Orthogonality(WeightGroup([...]))`` here. A single row has no pairs: 0 (Keras: NaN).
* :class:`SoftOrthogonality` — SO (Bansal, Chen, Wang, NeurIPS 2018): ‖W Wᵀ − I_n‖²_F, computed on the
  smaller side: for n > m it equals ‖Wᵀ W − I_m‖²_F + (n − m).
* :class:`DoubleSoftOrthogonality` — DSO: ‖W Wᵀ − I_n‖²_F + ‖Wᵀ W − I_m‖²_F = 2‖G − I_k‖²_F + |n − m|, G the
  k × k Gram on the smaller side.
* :class:`MutualCoherence` — MC: max_{i≠j} |ŵ_i·ŵ_j|.
* :class:`SRIP` — σ(G − I_k), the spectral norm of the smaller-side Gram minus I (``squared=True``: σ², what
  the authors' code returns). Computed exactly (``keras.ops.norm(ord=2)``, an SVD of the k × k matrix); the
  torch version estimates σ by power iteration and agrees once converged.
* :class:`CallablePenalty` — ``fn(W)`` for any function of the unit-rows matrix returning a scalar.

Every class takes ``(group=None, factor=0.01)`` (``CallablePenalty``: ``factor=1``) and is a Keras
``Regularizer`` (``get_config``, registered as ``finereg>Name``). Internally a matrix is handled as Wᵀ
(fan-in × units, the Keras kernel layout); every value is a function of one Gram matrix per matrix (one
matmul each), the Grams of one shape evaluated as a batch.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .._checks import FineregError, check_bool, check_choice
from .penalty import GroupPenalty

__all__ = [
    "Orthogonality",
    "SoftOrthogonality",
    "DoubleSoftOrthogonality",
    "MutualCoherence",
    "SRIP",
    "CallablePenalty",
]

KERAS_EPSILON = 1e-7  # keras.config.epsilon(): the norm floor of keras.ops.normalize


def _eye(g):
    return ops.eye(g.shape[-1], dtype=g.dtype)


def _cosine_matrix(k, axis: int):
    """Cosines between the vectors of k (m, n) along ``axis`` (0: its n columns, 1: its m rows).

    Keras normalizes first, ŵ = w · min(rsqrt(Σw²), 1/eps) = w / max(‖w‖, eps), then takes the Gram. When the
    vectors are long (length ≥ 2× their number) the Gram is taken first and normalized after, P = D G D with
    D = diag(1 / max(√G_ii, eps)): the same numbers without the elementwise passes over the kernel.
    """
    m, n = k.shape
    count, length = (n, m) if axis == 0 else (m, n)
    kt = ops.transpose(k)
    if length >= 2 * count:
        g = ops.matmul(kt, k) if axis == 0 else ops.matmul(k, kt)
        d = ops.rsqrt(ops.maximum(ops.diagonal(g), KERAS_EPSILON * KERAS_EPSILON))
        return g * ops.expand_dims(d, 1) * ops.expand_dims(d, 0)
    u = k * ops.rsqrt(ops.maximum(ops.sum(ops.square(k), axis=axis, keepdims=True), KERAS_EPSILON * KERAS_EPSILON))
    return ops.matmul(ops.transpose(u), u) if axis == 0 else ops.matmul(u, ops.transpose(u))


class _WithMode(GroupPenalty):
    def __init__(self, group=None, factor: float = 0.01, mode: str = "rows", uid: str | None = None):
        super().__init__(group, factor, uid)
        self.mode = check_choice(mode, "mode", ("rows", "columns"))

    def gram(self, k):
        """The cosine matrix of the units (mode "rows": k's columns) or of the fan-in vectors (k's rows)."""
        return _cosine_matrix(k, 0 if self.mode == "rows" else 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="finereg")
class Orthogonality(_WithMode):
    """Keras's ``OrthogonalRegularizer`` over a weight group: mean |cosine| between distinct rows (filters).

    ``mode="rows"`` (default): the output units; ``"columns"``: the fan-in vectors (see the module docstring).
    """

    def from_gram(self, p, fan_in, units):
        size = p.shape[-1]
        if size < 2:  # no pairs: 0 (Keras divides 0 by 0)
            return ops.sum(p, axis=(-2, -1)) * 0.0
        off = ops.sum(ops.abs(p), axis=(-2, -1)) - ops.sum(ops.abs(ops.diagonal(p, axis1=-2, axis2=-1)), axis=-1)
        return 0.5 * off / (size * (size - 1.0) / 2.0)


@keras.saving.register_keras_serializable(package="finereg")
class MutualCoherence(_WithMode):
    """Mutual coherence: the largest |cosine| between two distinct rows (``mode="rows"``) or columns."""

    def from_gram(self, p, fan_in, units):
        if p.shape[-1] < 2:
            return ops.sum(p, axis=(-2, -1)) * 0.0
        return ops.max(ops.abs(p * (1.0 - _eye(p))), axis=(-2, -1))


@keras.saving.register_keras_serializable(package="finereg")
class SoftOrthogonality(GroupPenalty):
    """Soft orthogonality ‖W Wᵀ − I‖²_F (Bansal et al. 2018), on the smaller side of W."""

    def from_gram(self, g, fan_in, units):
        return ops.sum(ops.square(g - _eye(g)), axis=(-2, -1)) + float(max(units - fan_in, 0))


@keras.saving.register_keras_serializable(package="finereg")
class DoubleSoftOrthogonality(GroupPenalty):
    """Double soft orthogonality ‖W Wᵀ − I‖²_F + ‖Wᵀ W − I‖²_F (Bansal et al. 2018)."""

    def from_gram(self, g, fan_in, units):
        return 2.0 * ops.sum(ops.square(g - _eye(g)), axis=(-2, -1)) + float(abs(units - fan_in))


@keras.saving.register_keras_serializable(package="finereg")
class SRIP(GroupPenalty):
    """SRIP (Bansal et al. 2018): σ(G − I), the spectral norm of the smaller-side Gram minus I; σ² with
    ``squared=True``. Exact (an SVD of the k × k matrix, k = min(units, fan-in))."""

    def __init__(self, group=None, factor: float = 0.01, squared: bool = False, uid: str | None = None):
        super().__init__(group, factor, uid)
        self.squared = check_bool(squared, "squared")

    def from_gram(self, g, fan_in, units):
        sigma = ops.norm(g - _eye(g), ord=2, axis=(-2, -1))
        return ops.square(sigma) if self.squared else sigma

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "squared": self.squared}


@keras.saving.register_keras_serializable(package="finereg")
class CallablePenalty(GroupPenalty):
    """Any function ``fn(W) -> scalar`` of a group matrix W (rows = output units, keras.ops inside), summed
    over the group's matrices, times ``factor``. A registered function (``keras.saving.register_keras_serializable``)
    is saved by name; a lambda needs ``safe_mode=False`` to load."""

    def __init__(self, fn, group=None, factor: float = 1.0, uid: str | None = None):
        if isinstance(fn, dict):
            fn = keras.saving.deserialize_keras_object(fn)
        if not callable(fn):
            raise FineregError(f"fn must be callable (matrix -> scalar), got {fn!r}")
        super().__init__(group, factor, uid)
        self.fn = fn

    def value(self, column_matrices: list):
        total = None
        for k in column_matrices:
            v = self.fn(ops.transpose(k))
            if tuple(getattr(v, "shape", ())) not in ((), (1,)):
                raise FineregError(f"the penalty function must return a scalar, got shape {tuple(v.shape)}")
            v = ops.reshape(v, ())
            total = v if total is None else total + v
        return total

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fn": self.fn}  # Keras serializes it
