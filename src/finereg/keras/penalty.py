"""Group penalties for Keras: one penalty over the weights of several layers, in the model's losses once.

A :class:`GroupPenalty` is a ``keras.regularizers.Regularizer`` bound to a :class:`~finereg.keras.WeightGroup`:

* ``penalty()`` → ``factor · Σ value(M)`` over the group's matrices M (the joined matrix, or each member's
  for ``axis=None``), read from the layers' current weights; matrices of one shape are evaluated batched.
* ``penalty(kernel)`` → the same on one kernel (units on its last axis): usable as any layer's
  ``kernel_regularizer``, like Keras's own regularizers.
* ``penalty.attach()`` adds the group's value to the losses of every model holding the members, once.

How ``attach`` works on every backend. Keras adds ``regularizer(v)`` to ``model.losses`` for each trainable
variable, where ``v`` is the variable (eager, symbolic) or its current traced value (JAX's stateless training
step). ``attach`` gives each member's variable a :class:`PenaltyShare` (wrapping the regularizer it had) that
hands ``v`` to the penalty; once the values of all members of one evaluation of ``model.losses`` are in, the
share of the last one returns the penalty of the joined matrix, the others return 0. So the model's losses
hold the group's value once, computed from exactly the values the training step differentiates.

Saving. The shares are the layers' ``kernel_regularizer`` (``depthwise_regularizer`` ...), so they are in the
layers' configs, each with the penalty's config (its members' names and a ``uid``); within one
``load_model`` the configs of one ``uid`` give one penalty object again. It binds each member when Keras
passes it the member's variable (or collects the values of a pass, as above). Keras evaluates regularizers
of *trainable* weights only, so a member that is not trainable cannot be found that way: :func:`bind`
(``finereg.keras.bind(model)``) binds every penalty of a model by name — needed after ``load_model`` only
when a member layer has ``trainable=False``, and after ``keras.models.clone_model``.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any

import keras
from keras import ops

from .._checks import FineregError, check_number
from ._layout import columns_view, config_attribute, named_layers
from .groups import WeightGroup

try:  # the scope of JAX's stateless training step (a traced value belongs to one scope)
    from keras.src.backend import get_stateless_scope as _stateless_scope
except ImportError:  # pragma: no cover - a Keras without it: passes are told apart by repeats only
    _stateless_scope = lambda: None  # noqa: E731


def _loading_objects() -> dict | None:
    """The objects of the ``load_model`` in progress (Keras's object-sharing map), or None outside one."""
    try:
        from keras.src.backend.common import global_state

        return global_state.get_global_attribute("shared_objects/id_to_obj_map")
    except ImportError:  # pragma: no cover
        return None


__all__ = ["GroupPenalty", "PenaltyShare", "bind"]


def _as_group(group) -> WeightGroup | None:
    if group is None or isinstance(group, WeightGroup):
        return group
    if isinstance(group, dict):
        return WeightGroup.from_config(group)
    if isinstance(group, (keras.layers.Layer, list, tuple)):
        return WeightGroup(group)
    raise FineregError(f"group must be a finereg.keras.WeightGroup, a layer or a list of layers, got {group!r}")


class _Pass:
    """The member values received during one evaluation of ``model.losses``."""

    def __init__(self, scope):
        self.scope = None if scope is None else weakref.ref(scope)
        self.values: dict[int, Any] = {}

    def same_scope(self, scope) -> bool:
        return (self.scope is None and scope is None) or (self.scope is not None and self.scope() is scope)


class GroupPenalty(keras.regularizers.Regularizer):
    """Base class: ``factor · Σ value(M)`` over the matrices M of a weight group (rows = output units).

    Matrices are handled as (fan-in, units) — the transposes of the unit-row matrices, Keras's kernel layout.
    Subclasses implement :meth:`from_gram` (and :meth:`gram` if not the smaller-side Gram): every built-in
    penalty is a function of a Gram matrix, so the kernels are read by one matmul each and nothing else.
    """

    def __init__(self, group=None, factor: float = 0.01, uid: str | None = None):
        self.group = _as_group(group)
        self.factor = check_number(factor, "factor", low=0)
        self.uid = uid or uuid.uuid4().hex
        self._pass: _Pass | None = None
        self._attached = False
        self._needs_bind: list[str] = []

    # -- to implement -------------------------------------------------------------------------------------
    def gram(self, k):
        """The Gram matrix the value is read from, for one (fan-in, units) matrix k: by default the one on the
        smaller side (kᵀk, units × units, if units ≤ fan-in, else k kᵀ)."""
        m, n = k.shape
        return ops.matmul(ops.transpose(k), k) if n <= m else ops.matmul(k, ops.transpose(k))

    def from_gram(self, g, fan_in: int, units: int):  # pragma: no cover - abstract
        """Values (B,) from a batch (B, s, s) of Grams of matrices of ``units`` rows and ``fan_in`` columns."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------------------
    def value(self, column_matrices: list):
        """Σ value(M) (no factor) over (fan-in, units) matrices.

        One matmul per matrix (its Gram; stacking the kernels into one batched matmul would first copy them
        all), then the Grams of equal shape are stacked and evaluated together: the rest is on s × s Grams.
        """
        buckets: dict[tuple, list] = {}
        for k in column_matrices:
            m, n = k.shape
            buckets.setdefault((m, n), []).append(self.gram(k))
        total = None
        for (m, n), grams in buckets.items():
            batch = ops.stack(grams) if len(grams) > 1 else ops.expand_dims(grams[0], 0)
            v = ops.sum(self.from_gram(batch, m, n))
            total = v if total is None else total + v
        return total

    def __call__(self, x=None):
        if x is None:
            if self.group is None:
                raise FineregError(
                    f"{type(self).__name__} has no group: build it with a WeightGroup, or call it on a kernel"
                )
            if not self.group.bound:
                raise FineregError(
                    f"{type(self).__name__} over {self.group.names} is not bound to layers (it was loaded from a "
                    "file): call finereg.keras.bind(model) or penalty.bind(model) first"
                )
            return self.factor * self.value(self.group.column_matrices())
        if len(x.shape) < 2:
            raise FineregError(
                f"{type(self).__name__} takes a kernel with at least 2 dims (units on the last axis), got shape "
                f"{tuple(x.shape)}"
            )
        return self.factor * self.value([columns_view(x, "last")])

    # -- attaching ----------------------------------------------------------------------------------------
    def attach(self) -> GroupPenalty:
        """Put the penalty into the losses of the model(s) holding the group's layers (once per evaluation).

        Each member weight gets a :class:`PenaltyShare` as its regularizer (its previous one is kept inside
        and still counted). With the JAX backend, attach before ``compile`` or compile again after, as for any
        regularizer change.
        """
        if self.group is None or not self.group.bound:
            raise FineregError("attach() needs a penalty built on a bound WeightGroup (layer objects or a model)")
        if self._attached:
            return self
        for i, m in enumerate(self.group.members):
            share = PenaltyShare(self, i, m.variable.regularizer)
            m.variable.regularizer = share
            attr = config_attribute(m.layer, self.group.param, "regularizer")
            if attr is not None:
                setattr(m.layer, attr, share)
        self._attached = True
        return self

    def detach(self) -> GroupPenalty:
        """Remove the penalty from its members' regularizers (their own regularizers stay)."""
        if not self._attached:
            return self
        for m in self.group.members:
            reg = _without(m.variable.regularizer, self)
            m.variable.regularizer = reg
            attr = config_attribute(m.layer, self.group.param, "regularizer") if m.layer is not None else None
            if attr is not None:
                setattr(m.layer, attr, reg)
        self._attached = False
        return self

    def bind(self, model) -> GroupPenalty:
        """Look the group's members up by name in ``model`` (after loading or cloning)."""
        if self.group is not None:
            self.group.bind(model)
        self._needs_bind = []
        return self

    def _collect(self, index: int, v):
        """A share's call: record member ``index``'s value; return the penalty once all are in, else 0."""
        members = self.group.members
        if self._needs_bind and any(members[i].variable is None for i in range(len(members))):
            raise FineregError(
                f"{type(self).__name__} over {self.group.names} was loaded from a file and its members "
                f"{self._needs_bind} are not trainable: Keras does not evaluate their regularizers, so the penalty "
                "cannot find them by itself. Call finereg.keras.bind(model) after load_model"
            )
        scope = _stateless_scope()
        p = self._pass
        if p is None or not p.same_scope(scope) or index in p.values:
            p = self._pass = _Pass(scope)
        p.values[index] = v
        m = members[index]
        if m.variable is None and isinstance(v, keras.Variable):
            m.variable = v  # a loaded penalty binds each member as Keras passes its variable
        waiting = [
            j for j, mm in enumerate(members) if j not in p.values and (mm.variable is None or mm.variable.trainable)
        ]
        if waiting:
            return ops.zeros((), dtype=v.dtype)
        self._pass = None
        return self.factor * self.value(self.group.column_matrices(p.values))

    # -- configuration ------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"factor": self.factor, "uid": self.uid, "group": None}
        if self.group is not None:
            config["group"] = self.group.get_config()
            config["group"]["untrainable"] = [
                m.name for m in self.group.members if m.variable is not None and not m.variable.trainable
            ]
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GroupPenalty:
        """A penalty from its config; within one ``load_model`` every member's config gives the same object
        (Keras writes a penalty in each member's layer config and does not share objects nested there)."""
        loading, key = _loading_objects(), ("finereg.keras.GroupPenalty", config.get("uid"))
        if loading is not None and key[1] is not None and key in loading:
            return loading[key]
        config = dict(config)
        group = config.get("group")
        untrainable = list(group.get("untrainable", [])) if isinstance(group, dict) else []
        penalty = cls(**config)
        penalty._needs_bind = untrainable
        if loading is not None and key[1] is not None:
            loading[key] = penalty
        return penalty

    def __repr__(self) -> str:
        group = self.group.names if self.group is not None else None
        return f"{type(self).__name__}(group={group}, factor={self.factor})"


def _without(reg, penalty: GroupPenalty):
    """``reg`` (a chain of shares around a regularizer) with the share of ``penalty`` taken out."""
    if not isinstance(reg, PenaltyShare):
        return reg
    if reg.penalty is penalty:
        return reg.regularizer
    reg.regularizer = _without(reg.regularizer, penalty)
    return reg


@keras.saving.register_keras_serializable(package="finereg")
class PenaltyShare(keras.regularizers.Regularizer):
    """The regularizer :meth:`GroupPenalty.attach` puts on member ``index``'s weight: its value goes to the
    group penalty (see the module docstring); ``regularizer``, the weight's previous one, is still added."""

    def __init__(self, penalty: GroupPenalty | dict, index: int, regularizer=None):
        if isinstance(penalty, dict):
            penalty = keras.saving.deserialize_keras_object(penalty)
        if not isinstance(penalty, GroupPenalty):
            raise FineregError(f"penalty must be a finereg.keras group penalty, got {penalty!r}")
        self.penalty, self.index = penalty, int(index)
        self.regularizer = keras.regularizers.get(regularizer)

    def __call__(self, x):
        out = self.penalty._collect(self.index, x)
        return out if self.regularizer is None else out + self.regularizer(x)

    def get_config(self) -> dict[str, Any]:
        # objects, not their configs: Keras serializes them, and a penalty met twice in one .keras file is
        # written once and shared on loading
        return {"penalty": self.penalty, "index": self.index, "regularizer": self.regularizer}


def bind(model) -> list[GroupPenalty]:
    """Bind every group penalty attached to ``model``'s layers to those layers, by name; returns them.

    Needed after ``keras.models.load_model`` when a member layer is not trainable, and after
    ``keras.models.clone_model`` (whose copies of one penalty are joined back into one). Frozen entries need
    nothing: they travel in the layers' constraints.
    """
    found: dict[str, GroupPenalty] = {}
    for _, layer in named_layers(model):
        for var in layer.weights:
            share = var.regularizer
            while isinstance(share, PenaltyShare):
                first = found.setdefault(share.penalty.uid, share.penalty)
                share.penalty = first
                share = share.regularizer
    for penalty in found.values():
        for m in penalty.group.members:
            m.layer = m.variable = None
        penalty.bind(model)
        penalty._attached, penalty._pass = True, None
    return list(found.values())
