"""Convert a Keras model's convolutions to weight-standardized ones (weights kept), and bake them back.

``standardize(model, variant)`` returns a copy of a Functional or Sequential model (nested ones included) in
which every ``Conv1D/2D/3D`` (and, with ``dense=True``, ``Dense``) matching ``include`` and not ``exclude``
is the matching :mod:`~finereg.keras.standardized` layer holding the same kernel and bias — the Keras
counterpart of torch's ``finereg.standardize`` (a Keras model's graph cannot be edited in place, so the
result is a new model; ``keras.models.clone_model`` builds it). ``bake(model)`` returns a copy in which every
standardized layer is the plain layer holding Ŵ (gain folded in): same outputs, no finereg needed to load it.

Group penalties and frozen entries attached to the source model come along (they are in the layers'
configs; the copies of each penalty are joined into one and bound to the new model). Layers with a fan-in of
1 are left as they are. Transposed and depthwise convolutions are not converted.
"""

from __future__ import annotations

import fnmatch
import math

import keras
import numpy as np
from keras import ops

from .._checks import FineregError, check_bool, check_choice, check_number
from .._utils import unknown_name_error
from ..reparam._report import ConversionReport, finish
from ..reparam.standardize import VARIANTS
from ._layout import named_layers
from .penalty import bind
from .standardized import STANDARDIZED_LAYERS, _Standardized

__all__ = ["standardize", "bake"]


def _patterns(arg, label: str) -> list[str] | None:
    if arg is None:
        return None
    arg = [arg] if isinstance(arg, str) else arg
    if not isinstance(arg, (list, tuple)) or not all(isinstance(p, str) for p in arg):
        raise FineregError(f"{label} must be a glob pattern or a list of them (e.g. 'conv*'), got {arg!r}")
    return list(arg)


def _matches(path: str, name: str, pats: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in pats)


def _graph_model(model) -> bool:
    """A Sequential or Functional model (a layer graph ``clone_model`` can rebuild), not a subclassed one."""
    return isinstance(model, keras.Sequential) or any(c.__name__ == "Functional" for c in type(model).__mro__)


def _check_model(model, what: str) -> None:
    """``model`` is a built Functional or Sequential Keras model, and so is every model nested in it."""
    if not isinstance(model, keras.Model):
        raise FineregError(f"expected a Functional or Sequential Keras model, got {type(model).__name__}")
    nested = [(path, lay) for path, lay in named_layers(model) if isinstance(lay, keras.Model)]
    for path, m in [(model.name, model), *nested]:
        if not _graph_model(m):
            raise FineregError(
                f"{what} needs a Functional or Sequential Keras model (its layer graph is rebuilt); {path!r} is a "
                f"subclassed model ({type(m).__name__}), whose call() it cannot see: build it with the functional "
                "API, or use the standardized layers (finereg.keras.StandardizedConv2D ...) in it directly"
            )
    if not model.built:
        raise FineregError(
            f"{what}: the model {model.name!r} is not built (its layers have no weights yet): give it an input "
            "(keras.Input as its first layer), call it on a batch or call model.build(input_shape) first"
        )


def _clone(model, convert, fill):
    """A copy of ``model`` by ``clone_model`` (nested models too): ``convert(layer)`` gives a new layer or None
    (a plain copy); ``fill(src, new)`` fills the converted ones, the others get their source's weights."""
    if not isinstance(model, keras.Model):
        raise FineregError(f"expected a Functional or Sequential Keras model, got {type(model).__name__}")
    converted: set[int] = set()

    def clone(layer):
        if isinstance(layer, keras.Model):  # a nested model: cloned the same way (clone_model(recursive=True)
            return keras.models.clone_model(layer, clone_function=clone)  # fails on some nestings)
        new = convert(layer)
        if new is None:
            return layer.__class__.from_config(layer.get_config())
        converted.add(id(new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone)
    old = dict(named_layers(model))
    for path, new in named_layers(new_model):
        if isinstance(getattr(new, "layers", None), list) or not new.weights:
            continue  # a nested model (its layers are visited one by one), an input or a weightless layer
        if id(new) in converted:
            fill(old[path], new)
        else:
            new.set_weights(old[path].get_weights())
    bind(new_model)  # penalties attached to the source come along as copies: join and bind them
    return new_model


def standardize(
    model,
    variant: str = "ws",
    include=None,
    exclude=None,
    *,
    dense: bool = False,
    eps: float | None = None,
    gamma: float = 1.0,
    gain_init: float = 1.0,
    strict: bool = False,
):
    """A copy of ``model`` whose convolutions are weight-standardized (see the module docstring).

    Args:
        model: a Functional or Sequential Keras model (built).
        variant: ``"ws"``, ``"bit"`` or ``"scaled"``.
        include, exclude: glob patterns over layer names / paths (``"conv*"``, ``"backbone/*"``); default: every
            convolution. A pattern matching no layer is an error.
        dense: also standardize ``Dense`` layers.
        eps, gamma, gain_init: as in :class:`~finereg.keras.StandardizedConv2D`.
        strict: a model with nothing to standardize raises an error (default: a
            :class:`~finereg._checks.FineregWarning`, as torch's ``finereg.standardize``).

    Returns the new model.
    """
    check_choice(variant, "variant", tuple(VARIANTS))
    check_bool(dense, "dense")
    check_bool(strict, "strict")
    if eps is not None:  # the layers' own checks, here: inside clone_model they surface as Keras's TypeError
        check_number(eps, "eps", low=0, low_open=True)
    check_number(gamma, "gamma")
    check_number(gain_init, "gain_init")
    _check_model(model, "standardize")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    named = named_layers(model)
    for label, pats in (("include", inc), ("exclude", exc)):
        for p in pats or []:
            if not any(_matches(path, lay.name, [p]) for path, lay in named):
                raise unknown_name_error("layer", p, [path for path, _ in named], hint=f"({label} pattern)")
    chosen: dict[int, str] = {}
    report = ConversionReport(f"weight standardization ({variant!r})")
    for path, layer in named:
        target = STANDARDIZED_LAYERS.get(type(layer))
        if target is None or (target is STANDARDIZED_LAYERS[keras.layers.Dense] and not dense):
            continue
        if inc is not None and not _matches(path, layer.name, inc) or exc and _matches(path, layer.name, exc):
            continue
        if math.prod(layer.kernel.shape[:-1]) < 2:
            report.skipped.append((path, f"fan-in {math.prod(layer.kernel.shape[:-1])} < 2"))
            continue
        chosen[id(layer)] = path
        report.changed.append((path, type(layer).__name__))
    kinds = "convolution" + (" or Dense layer" if dense else "")
    hint = "" if dense else " (Dense layers are standardized only with dense=True)"
    finish(report, strict, f"no {kinds} to standardize (include={include!r}, exclude={exclude!r}){hint}")
    extra = {"variant": variant, "eps": eps, "gamma": gamma, "gain_init": gain_init}

    def convert(layer):
        if id(layer) not in chosen:
            return None
        return STANDARDIZED_LAYERS[type(layer)].from_config({**layer.get_config(), **extra})

    def fill(src, new):
        new._kernel.assign(src._kernel)
        if new.use_bias:
            new.bias.assign(src.bias)

    return _clone(model, convert, fill)


def bake(model):
    """A copy of ``model`` in which every standardized layer is the plain layer holding Ŵ (same outputs)."""
    _check_model(model, "bake")
    plain = {v: k for k, v in STANDARDIZED_LAYERS.items()}

    def convert(layer):
        if not isinstance(layer, _Standardized):
            return None
        config = {k: v for k, v in layer.get_config().items() if k not in ("variant", "eps", "gamma", "gain_init")}
        return plain[type(layer)].from_config(config)

    def fill(src, new):
        new._kernel.assign(np.asarray(ops.convert_to_numpy(src.kernel)))
        if new.use_bias:
            new.bias.assign(src.bias)

    return _clone(model, convert, fill)
