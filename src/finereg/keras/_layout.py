"""Where a Keras weight keeps its output units, and how layers and their weights are found by name.

Keras stores the output units (filters) of a weight on its *last* axes, PyTorch on its first:

    layer                       Keras variable                        units         kind      torch weight
    Dense                       kernel (in, units)                    last axis     "last"    (out, in)
    Conv1D/2D/3D                kernel (k..., in/groups, filters)     last axis     "last"    (out, in/groups, k...)
    SeparableConv pointwise     pointwise_kernel (1..., in·dm, f)     last axis     "last"    (out, in·dm, 1...)
    Conv1D/2D/3DTranspose       kernel (k..., filters, in)            axis -2       "second"  (in, out, k...)
    DepthwiseConv1D/2D          kernel (k..., in, dm)                 last 2 axes   "last2"   (in·dm, 1, k...)
    SeparableConv depthwise     depthwise_kernel (k..., in, dm)       last 2 axes   "last2"   (in·dm, 1, k...)
    Embedding                   embeddings (input_dim, output_dim)    axis 0        "first"   (num, dim)
    any other ≥ 2-D weight      (..., units)                          last axis     "last"

:func:`columns_view` gives the weight as a (fan-in, units) matrix: column o holds the weights feeding output
unit o, in Keras's order (kernel positions, then input channels; for "last" a plain reshape, no copy) or,
with ``order="torch"``, in torch's (input channel, then kernel position). The matrix of a
:class:`~finereg.keras.WeightGroup` is its transpose (one *row* per unit, as in torch's ``WeightGroup``).
The order is a permutation of one member's fan-in, so it changes no inner product between two units of one
member; it matters only when members of different kernel shapes are joined along the units (their columns
are then aligned in that order), and for a user callable.
"""

from __future__ import annotations

import fnmatch

import keras
import numpy as np
from keras import ops

from .._checks import FineregError
from .._utils import unknown_name_error

__all__ = [
    "named_layers",
    "find_layer",
    "weight_variable",
    "unit_kind",
    "n_units",
    "columns_view",
    "units_mask",
    "config_attribute",
]

_GLOB_CHARS = set("*?[")


def _is_model(layer) -> bool:
    return isinstance(layer, keras.Model) or isinstance(getattr(layer, "layers", None), list)


def named_layers(model) -> list[tuple[str, keras.layers.Layer]]:
    """``(path, layer)`` of every layer of ``model`` in order, nested models included (``"backbone/conv1"``).

    Top-level layers are named by their ``name``; a layer of a nested model by ``"<model name>/<name>"``.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a Keras model or layer, got {type(model).__name__}")
    out: list[tuple[str, keras.layers.Layer]] = []

    def walk(container, prefix: str) -> None:
        for layer in container.layers:
            path = f"{prefix}{layer.name}"
            out.append((path, layer))
            if _is_model(layer):
                walk(layer, path + "/")

    if _is_model(model):
        walk(model, "")
    else:
        out.append((model.name, model))
    return out


def find_layer(model, name: str) -> list[tuple[str, keras.layers.Layer]]:
    """The layers of ``model`` named ``name``: a path (``"backbone/conv1"``), a layer name, or a glob pattern
    (``"conv*"``, ``"backbone/*"``; matched against paths and names). Unknown names raise listing close ones."""
    named = named_layers(model)
    if not (_GLOB_CHARS & set(name)):
        hits = [(p, lay) for p, lay in named if p == name] or [(p, lay) for p, lay in named if lay.name == name]
        if len(hits) > 1:
            raise FineregError(
                f"layer name {name!r} is ambiguous in {model.name}: {[p for p, _ in hits]}; use the path"
            )
        if not hits:
            raise unknown_name_error("layer", name, [p for p, _ in named], hint=f"in model {model.name!r}")
        return hits
    return [(p, lay) for p, lay in named if fnmatch.fnmatchcase(p, name) or fnmatch.fnmatchcase(lay.name, name)]


def weight_variable(layer, param: str):
    """The Keras variable ``param`` of ``layer`` (its ``name``, e.g. ``"kernel"``, ``"depthwise_kernel"``)."""
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"expected a Keras layer, got {type(layer).__name__}")
    if not layer.built:
        raise FineregError(
            f"layer {layer.name!r} is not built yet: build the model first (call it on data, or build it with an "
            "Input) so that its weights exist"
        )
    found = [v for v in layer.weights if v.name == param]
    if len(found) > 1:
        raise FineregError(
            f"layer {layer.name!r} holds {len(found)} weights named {param!r} ({[v.path for v in found]}); name one "
            "of its inner layers instead"
        )
    if not found:
        raise unknown_name_error(
            "weight", param, [v.name for v in layer.weights], hint=f"on layer {layer.name!r} ({type(layer).__name__})"
        )
    return found[0]


def unit_kind(layer, param: str, shape) -> str:
    """Where the output units of ``layer``'s weight ``param`` of shape ``shape`` sit (see the module table)."""
    if len(shape) < 2:
        return "first"  # a bias or a norm scale: one entry per unit
    if isinstance(layer, keras.layers.Embedding):
        return "first"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "last2"
    if param == "depthwise_kernel":
        return "last2"
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return "second"
    return "last"


def n_units(shape, kind: str) -> int:
    if kind == "first":
        return int(shape[0])
    if kind == "last2":
        return int(shape[-2]) * int(shape[-1])
    if kind == "second":
        return int(shape[-2])
    return int(shape[-1])


def columns_view(x, kind: str, order: str = "keras"):
    """``x`` (a Keras weight or its value) as a (fan-in, units) matrix, with keras.ops (any backend).

    ``order="keras"``: the fan-in in the kernel's own order (kernel positions, then input channels), a plain
    reshape for "last"; ``order="torch"``: input channels first, then kernel positions, as torch's matrix.
    """
    x = ops.convert_to_tensor(x)  # a Keras variable: its current value (the traced one in a stateless scope)
    shape = tuple(x.shape)
    u = n_units(shape, kind)
    if order == "torch" and len(shape) > 2 and kind in ("last", "second"):
        x = ops.moveaxis(x, -2 if kind == "last" else -1, 0)  # (in, k..., units)
        return ops.reshape(x, (-1, u))
    if kind in ("last", "last2"):
        return ops.reshape(x, (-1, u))
    if kind == "second":
        return ops.transpose(ops.reshape(ops.moveaxis(x, -2, 0), (u, -1)))
    return ops.transpose(ops.reshape(x, (u, -1)))


def units_mask(shape, kind: str, units) -> np.ndarray:
    """A bool mask of ``shape`` that is True on every entry of the given output units (numpy, built once)."""
    shape = tuple(int(s) for s in shape)
    u = n_units(shape, kind)
    idx = np.asarray(units)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise FineregError(
            f"frozen must be a bool mask of the weight's shape {shape} or a list of output-unit indices, got {units!r}"
        )
    bad = idx[(idx < -u) | (idx >= u)]
    if bad.size:
        raise FineregError(
            f"output-unit index {int(bad[0])} is out of range for a weight with {u} output units "
            f"(valid: 0..{u - 1}, or negative from the end)"
        )
    flags = np.zeros(u, dtype=bool)
    flags[idx] = True
    if kind == "first":
        return np.broadcast_to(flags.reshape((u,) + (1,) * (len(shape) - 1)), shape).copy()
    if kind == "second":
        return np.broadcast_to(flags.reshape((u, 1)), shape).copy()
    return np.broadcast_to(flags.reshape(shape[-2:]) if kind == "last2" else flags, shape).copy()


def config_attribute(layer, param: str, what: str) -> str | None:
    """The constructor argument of ``layer`` that holds the ``what`` ("regularizer" / "constraint") of its
    weight ``param`` (``kernel_regularizer``, ``depthwise_constraint`` ...), or None if it has none."""
    stem = param[: -len("_kernel")] if param.endswith("_kernel") else param
    names = [f"{param}_{what}", f"{stem}_{what}"]
    if param == "kernel":
        names.append(f"depthwise_{what}")
    try:
        config = layer.get_config()
    except NotImplementedError:  # a custom layer without a config: the attachment is not saved with it
        return None
    for n in names:
        if n in config and hasattr(layer, n):
            return n
    return None
