"""Exact partial freezing of a Keras weight: chosen entries (filters, rows, any mask) never change.

``freeze(layer, "kernel", frozen)`` gives the layer's variable a :class:`FrozenEntries` constraint

    w ← where(mask, values, w)

with ``mask`` (True = frozen) and ``values`` (the frozen entries' values when frozen). Keras optimizers apply a
variable's constraint right after every update (``optimizer.apply``: update, then ``w.assign(constraint(w))``,
on every backend), so whatever moved the frozen entries — momentum from earlier steps, weight decay (AdamW, or
``weight_decay=`` of any optimizer), Adam's and RMSprop's running averages — is undone bit-exactly in the same
step. The trainable entries get exactly the update they would get without freezing, for element-wise optimizers
(SGD with or without (Nesterov) momentum, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, Nadam, Lion ...):
their gradient is computed with the frozen entries at their frozen values, as in torch's ``finereg.freeze``.
Unlike torch's version, the frozen entries' gradient is not zeroed (a constraint cannot), which matters only
to what mixes entries of a gradient: ``clipnorm`` / ``global_clipnorm`` count them, and factored or
matrix optimizers (Adafactor, Muon, LAMB) use them in their statistics. ``use_ema=True`` is not exact: at
the end of ``fit`` Keras overwrites the weights with their moving averages without applying constraints
(``freeze(..., model=)`` refuses such a model).

The penalty of a group still sees every entry, frozen ones included (they are part of the variable).

``frozen`` is a bool mask of the weight's shape, or output-unit indices (filters of a Conv / units of a Dense:
the last axis of a Keras kernel; see :mod:`finereg.keras._layout` for transposed and depthwise kernels).
Calling ``freeze`` again adds to the frozen set; ``unfreeze`` removes it. The mask and values are in the
layer's config (``kernel_constraint``), so they travel with ``model.save`` to a ``.keras`` file, exactly.

Changing the frozen set between ``fit`` calls: with the torch backend the next step uses it. Backends that
compile the training step (JAX, TensorFlow) read the constraint when the step is compiled: pass ``model=``
(the step is recompiled at the next ``fit``) or call ``model.compile(...)`` again, as Keras asks after
changing ``layer.trainable``.
"""

from __future__ import annotations

import base64
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from .._checks import FineregError
from ._layout import config_attribute, unit_kind, units_mask, weight_variable

__all__ = ["FrozenEntries", "freeze", "unfreeze", "frozen_mask"]


def _encode(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _decode(s: str, dtype, count: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype, count=count).copy()


@keras.saving.register_keras_serializable(package="finereg")
class FrozenEntries(keras.constraints.Constraint):
    """Constraint ``w ↦ where(mask, values, constraint(w))``: entries under ``mask`` keep ``values`` exactly.

    Args:
        mask: bool array of the weight's shape (True = frozen).
        values: array of the weight's shape; only the entries under ``mask`` are used.
        constraint: the weight's previous constraint, applied first (its result is then overridden on the
            frozen entries).
    The config stores the mask as packed bits and the frozen values as raw bytes (base64): exact and compact.
    """

    def __init__(self, mask, values, constraint=None, shape=None, dtype=None):
        if isinstance(mask, str):  # from a config: packed bits + the frozen values only
            shape = tuple(shape)
            n = int(np.prod(shape))
            mask = np.unpackbits(np.frombuffer(base64.b64decode(mask), dtype=np.uint8), count=n).astype(bool)
            mask = mask.reshape(shape)
            full = np.zeros(shape, dtype=dtype)
            full[mask] = _decode(values, dtype, int(mask.sum()))
            values = full
        self.mask = np.array(mask, dtype=bool)
        self.values = np.array(values)
        if self.mask.shape != self.values.shape:
            raise FineregError(f"mask shape {self.mask.shape} differs from values shape {self.values.shape}")
        self.constraint = keras.constraints.get(constraint)
        self._cache: tuple | None = None
        self._used_compiled = False

    @property
    def n_frozen(self) -> int:
        return int(self.mask.sum())

    def _tensors(self):
        if self._cache is None:
            mask, values = ops.convert_to_tensor(self.mask), ops.convert_to_tensor(self.values)
            if keras.backend.backend() != "torch":  # a value made inside a compiled step must not be kept
                return mask, values
            self._cache = (mask, values)
        return self._cache

    def __call__(self, w):
        if keras.backend.backend() != "torch":
            self._used_compiled = True
        if self.constraint is not None:
            w = self.constraint(w)
        w = ops.convert_to_tensor(w)
        mask, values = self._tensors()
        return ops.where(mask, ops.cast(values, w.dtype), w)

    def _update(self, mask: np.ndarray, values: np.ndarray) -> None:
        self.mask, self.values, self._cache = mask, values, None

    def get_config(self) -> dict[str, Any]:
        return {
            "mask": _encode(np.packbits(self.mask.reshape(-1))),
            "values": _encode(self.values[self.mask]),
            "shape": list(self.mask.shape),
            "dtype": str(self.values.dtype),
            "constraint": self.constraint,  # Keras serializes it
        }

    def __repr__(self) -> str:
        return f"FrozenEntries(frozen={self.n_frozen}/{self.mask.size})"


def _make_mask(layer, name: str, shape: tuple[int, ...], frozen) -> np.ndarray:
    if hasattr(frozen, "shape") and not isinstance(frozen, np.ndarray):
        frozen = ops.convert_to_numpy(frozen)
    if isinstance(frozen, (str, bytes, dict, set)) or frozen is None:
        raise FineregError(
            f"frozen must be a bool mask of {name}'s shape {shape} or a list of output-unit indices, got {frozen!r}"
        )
    arr = np.asarray(frozen)
    if arr.dtype == bool:
        if arr.shape != shape:
            raise FineregError(
                f"frozen mask has shape {arr.shape} but {name} has shape {shape}; pass a bool mask of the weight's "
                "shape, or a list of output-unit indices"
            )
        return arr.copy()
    if arr.shape == shape and arr.ndim > 1:
        raise FineregError(f"frozen mask must be bool (True = frozen), got dtype {arr.dtype}; use mask.astype(bool)")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    return units_mask(shape, unit_kind(layer, name, shape), arr)


def _check_model(model) -> None:
    if model is None:
        return
    if not isinstance(model, keras.Model):
        raise FineregError(f"model must be a Keras model, got {type(model).__name__}")
    if getattr(getattr(model, "optimizer", None), "use_ema", False):
        raise FineregError(
            "the model's optimizer has use_ema=True: at the end of fit Keras writes the averaged weights back "
            "without applying constraints, so frozen entries would change; compile with use_ema=False"
        )


def _forget_compiled_step(model, constraint: FrozenEntries | None, what: str) -> None:
    if model is not None:
        model.train_function = None  # rebuilt (and recompiled) at the next fit
    elif constraint is not None and constraint._used_compiled:
        warnings.warn(
            f"{what}: the {keras.backend.backend()} backend compiled the training step with the previous frozen set; "
            "pass model=... (or call model.compile(...) again) so that the next fit uses the new one",
            stacklevel=3,
        )


def freeze(layer, name: str = "kernel", frozen=(), *, model=None):
    """Freeze part of ``layer``'s weight ``name``: the entries under ``frozen`` keep their current values.

    Args:
        layer: a built Keras layer.
        name: the weight's name (``"kernel"``, ``"bias"``, ``"depthwise_kernel"``, ``"embeddings"`` ...).
        frozen: a bool mask of the weight's shape (True = frozen), or output-unit indices (filters; negative
            from the end).
        model: the model to train next (with JAX / TensorFlow, its compiled training step is rebuilt).

    Freezing again adds to the frozen set (newly frozen entries keep their current values). Returns the layer.
    """
    _check_model(model)
    var = weight_variable(layer, name)
    shape = tuple(int(s) for s in var.shape)
    mask = _make_mask(layer, name, shape, frozen)
    current = np.array(ops.convert_to_numpy(var.value))
    old = var.constraint
    if isinstance(old, FrozenEntries):
        old._update(old.mask | mask, np.where(old.mask, old.values, current))
        _forget_compiled_step(model, old, f"freeze({layer.name!r}, {name!r})")
        return layer
    constraint = FrozenEntries(mask, current, old)
    var.constraint = constraint
    attr = config_attribute(layer, name, "constraint")
    if attr is not None:
        setattr(layer, attr, constraint)
    _forget_compiled_step(model, None, "")
    return layer


def unfreeze(layer, name: str = "kernel", *, model=None):
    """Remove the freezing of ``layer``'s weight ``name`` (its previous constraint, if any, is restored)."""
    _check_model(model)
    var = weight_variable(layer, name)
    c = var.constraint
    if not isinstance(c, FrozenEntries):
        raise FineregError(f"{layer.name}.{name} is not frozen (its constraint is {c!r})")
    var.constraint = c.constraint
    attr = config_attribute(layer, name, "constraint")
    if attr is not None:
        setattr(layer, attr, c.constraint)
    _forget_compiled_step(model, c, f"unfreeze({layer.name!r}, {name!r})")
    return layer


def frozen_mask(layer, name: str = "kernel") -> np.ndarray | None:
    """The bool mask of the frozen entries of ``layer``'s weight ``name`` (a copy), or None if not frozen."""
    c = weight_variable(layer, name).constraint
    return c.mask.copy() if isinstance(c, FrozenEntries) else None
