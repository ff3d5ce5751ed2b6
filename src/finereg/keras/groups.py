"""Keras weight groups: weights of several layers viewed as matrices (one row per output unit) and joined.

``WeightGroup(layers_or_patterns, model=None, axis=0)`` names the weight ``param`` (default ``"kernel"``) of
several Keras layers — layer objects, names, paths of nested models (``"backbone/conv1"``) or glob patterns
(``"conv*"``) — views each as a matrix with **one row per output unit** (the Keras layouts are in
:mod:`finereg.keras._layout`), and joins them as ``finereg.WeightGroup`` does:

* ``axis=0``: rows stacked — a units × fan-in matrix (members need equal fan-ins), e.g. the seed's
  ``Conv2D(10, 1)`` on 1024 channels is 10 × 1024, and ten ``Conv2D(1, 1)`` layers give the same 10 × 1024;
* ``axis=1``: columns side by side (members need equal numbers of units);
* ``axis=None``: not joined; a penalty takes each member's matrix and the values are summed.

For a Keras kernel K of shape (k..., in, units) the row of unit o is ``reshape(K, (-1, units))[:, o]``: the
matrix is ``reshape(K, (-1, units))ᵀ``, what ``keras.regularizers.OrthogonalRegularizer(mode="columns")``
sees when given the kernel reshaped to (fan-in, filters).

A group made from layer objects is *bound* (it holds the variables). Saved in a ``.keras`` file it keeps the
member names; :meth:`bind` looks them up again in a model (a penalty does it by itself, see
:mod:`finereg.keras.penalty`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from .._checks import FineregError, check_choice
from .._utils import unknown_name_error
from ._layout import columns_view, find_layer, n_units, named_layers, unit_kind, weight_variable

__all__ = ["WeightGroup", "GroupMember"]


@dataclass
class GroupMember:
    """One weight of a group: its name (layer name or path), where its units sit (``kind``), its shape, and —
    when bound — the layer and the Keras variable."""

    name: str
    kind: str
    shape: tuple[int, ...]
    layer: Any = None
    variable: Any = None
    order: str = "keras"

    def columns(self, value=None):
        """The (fan-in, units) matrix of ``value`` (default: the variable's current value)."""
        if value is None:
            if self.variable is None:
                raise FineregError(f"group member {self.name!r} is not bound to a layer; call bind(model) first")
            value = self.variable.value
        return columns_view(value, self.kind, self.order)

    @property
    def fan_in_units(self) -> tuple[int, int]:
        u = n_units(self.shape, self.kind)
        return math.prod(self.shape) // u, u


class WeightGroup:
    """The weight ``param`` of several Keras layers, each a matrix with one row per output unit, joined.

    Args:
        layers_or_patterns: a Keras layer, a layer name / path / glob pattern, or a sequence mixing them.
            Names and patterns need ``model``; a pattern keeps the layers that hold a ≥ 2-D weight ``param``.
        model: the model that names are looked up in (nested models: ``"backbone/conv1"``).
        axis: ``0`` stack the rows (default), ``1`` put the columns side by side, ``None`` keep them apart.
        param: the weight's name on each layer (``"kernel"``; ``"depthwise_kernel"``, ``"embeddings"`` ...).
        order: the order of each row's fan-in: ``"keras"`` (default; kernel positions then input channels,
            Keras's ``reshape(kernel, (-1, filters))``) or ``"torch"`` (input channels first: torch's matrix, so
            a join of members with different kernel shapes along the units equals torch's exactly).
    """

    def __init__(
        self, layers_or_patterns, model=None, axis: int | None = 0, *, param: str = "kernel", order: str = "keras"
    ):
        if not isinstance(param, str) or not param:
            raise FineregError(f"param must be a weight name such as 'kernel', got {param!r}")
        if isinstance(axis, bool):
            raise FineregError(f"axis must be one of 0, 1, None, got {axis!r}")
        check_choice(axis, "axis", (0, 1, None))
        if model is not None and not isinstance(model, keras.layers.Layer):
            raise FineregError(f"model must be a Keras model, got {type(model).__name__}")
        self.param, self.axis, self.order = param, axis, check_choice(order, "order", ("keras", "torch"))
        self.members: list[GroupMember] = self._resolve(layers_or_patterns, model)
        if not self.members:
            raise FineregError("a weight group needs at least one member")
        self._check_joinable()

    # -- construction -------------------------------------------------------------------------------------
    def _resolve(self, items, model) -> list[GroupMember]:
        if isinstance(items, (keras.layers.Layer, str)):
            items = [items]
        if not isinstance(items, Sequence):
            raise FineregError(
                "layers_or_patterns must be a layer, a name / glob pattern, or a list of them; "
                f"got {type(items).__name__}"
            )
        paths = {id(lay): p for p, lay in named_layers(model)} if model is not None else {}
        out: list[GroupMember] = []
        seen: set[int] = set()
        for i, item in enumerate(items):
            if isinstance(item, keras.layers.Layer):
                found = [(paths.get(id(item), item.name), item)]
            elif isinstance(item, str):
                if model is None:
                    raise FineregError(
                        f"member {item!r} is a name; pass model=... to look it up (or pass the layer object itself)"
                    )
                found = self._lookup(item, model)
            else:
                raise FineregError(f"member {i} must be a Keras layer or a name / glob pattern, got {item!r}")
            for name, layer in found:
                if id(layer) in seen:
                    continue
                seen.add(id(layer))
                var = weight_variable(layer, self.param)
                shape = tuple(int(s) for s in var.shape)
                if len(shape) < 2:
                    raise FineregError(
                        f"{name}.{self.param} has shape {shape}; weight groups take weights with at least 2 dims"
                    )
                out.append(GroupMember(name, unit_kind(layer, self.param, shape), shape, layer, var, self.order))
        return out

    def _lookup(self, pattern: str, model) -> list[tuple[str, Any]]:
        hits = find_layer(model, pattern)
        if not (set("*?[") & set(pattern)):
            return hits  # a plain name or path: that layer (a missing weight is reported by weight_variable)
        usable = [(p, lay) for p, lay in hits if _has_matrix(lay, self.param)]
        if not usable:
            candidates = [p for p, lay in named_layers(model) if _has_matrix(lay, self.param)]
            raise unknown_name_error(
                f"layer with a ≥2-D {self.param!r}", pattern, candidates, hint="(no match for this pattern)"
            )
        return usable

    def _check_joinable(self) -> None:
        if self.axis is None:
            return
        sizes = {m.name: m.fan_in_units for m in self.members}
        other = 0 if self.axis == 0 else 1  # axis=0 joins units: fan-ins must agree; axis=1: units must agree
        if len({s[other] for s in sizes.values()}) > 1:
            what = "fan-ins (columns)" if self.axis == 0 else "numbers of units (rows)"
            listing = ", ".join(f"{n}: {u}×{f}" for n, (f, u) in sizes.items())
            raise FineregError(
                f"cannot join along axis={self.axis}: the members' matrices (units × fan-in) have different {what} "
                f"({listing}). Use axis={1 - self.axis}, axis=None (a penalty on each matrix, summed), "
                "or separate groups"
            )

    # -- binding ------------------------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return all(m.variable is not None for m in self.members)

    def bind(self, model) -> WeightGroup:
        """Look the members up again by name in ``model`` (e.g. after ``keras.models.load_model``)."""
        for m in self.members:
            (_, layer), *_ = find_layer(model, m.name)
            var = weight_variable(layer, self.param)
            if tuple(int(s) for s in var.shape) != m.shape:
                raise FineregError(f"layer {m.name!r}: {self.param} has shape {tuple(var.shape)}, expected {m.shape}")
            m.layer, m.variable = layer, var
        return self

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"WeightGroup({self.names}, param={self.param!r}, axis={self.axis}, order={self.order!r})"

    @property
    def variables(self) -> list:
        return [m.variable for m in self.members]

    def column_matrices(self, values: dict[int, Any] | None = None) -> list:
        """What a penalty evaluates, each as (fan-in, units) (the transpose of the unit-rows matrix): the
        joined matrix, or each member's for ``axis=None``. ``values`` overrides members' values by index."""
        values = values or {}
        cols = [m.columns(values.get(i)) for i, m in enumerate(self.members)]
        if self.axis is None or len(cols) == 1:
            return cols
        return [ops.concatenate(cols, axis=1 - self.axis)]

    def matrices(self) -> list:
        """The members' current weights, each as a matrix with one row per output unit."""
        return [ops.transpose(m.columns()) for m in self.members]

    def matrix(self):
        """The members' matrices joined along ``axis`` (rows = output units)."""
        if self.axis is None:
            raise FineregError("this group is not joined (axis=None); use .matrices(), or build it with axis=0 or 1")
        return ops.transpose(self.column_matrices()[0])

    @property
    def shape(self) -> tuple[int, int] | list[tuple[int, int]]:
        sizes = [(u, f) for f, u in (m.fan_in_units for m in self.members)]
        if self.axis is None:
            return sizes
        if self.axis == 0:
            return (sum(s[0] for s in sizes), sizes[0][1])
        return (sizes[0][0], sum(s[1] for s in sizes))

    # -- serialization ------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "members": [{"name": m.name, "kind": m.kind, "shape": list(m.shape)} for m in self.members],
            "param": self.param,
            "axis": self.axis,
            "order": self.order,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WeightGroup:
        """An unbound group (member names only); :meth:`bind` attaches it to a model's layers."""
        group = cls.__new__(cls)
        group.param, group.axis, group.order = config["param"], config["axis"], config.get("order", "keras")
        group.members = [
            GroupMember(m["name"], m["kind"], tuple(m["shape"]), order=group.order) for m in config["members"]
        ]
        return group


def _has_matrix(layer, param: str) -> bool:
    return any(v.name == param and len(v.shape) >= 2 for v in layer.weights) if layer.built else False
