"""What ``freeze`` and ``standardize`` share on top of ``torch.nn.utils.parametrize``.

* Each module owns its parametrized class. ``parametrize`` keeps the parametrized tensors as properties of a class
  made per module, but ``copy.deepcopy`` shares that class between the original and the copy, so adding or removing
  a parametrization on one would edit the other's class too (``unfreeze(copy)`` breaks the original with an
  AttributeError, ``freeze(copy, "bias", ...)`` its forward with a KeyError). Before any change the module gets a
  sibling class with the same properties (:func:`own_class`).
* A faster getter for a chain of one parametrization (:func:`install_fast_getter`).
* Reparametrizing a model already wrapped in DistributedDataParallel is refused (:func:`refuse_ddp`): DDP has
  registered the parameters and their gradient hooks, so the change fails later with a misleading DDP error.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .._checks import FineregError

__all__ = ["own_class", "install_fast_getter", "refuse_ddp", "index_of", "register", "remove"]


def refuse_ddp(model: nn.Module, what: str) -> None:
    """Raise a :class:`~finereg._checks.FineregError` if ``model`` is, or wraps, a DistributedDataParallel."""
    m = model
    while True:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            raise FineregError(
                f"{what} cannot change a model already wrapped in DistributedDataParallel (DDP has registered its "
                f"parameters): reparametrize before wrapping, i.e. call {what} on the model, then "
                "DistributedDataParallel(model)"
            )
        inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = m.module if isinstance(m, nn.DataParallel) else None
        if inner is None:
            return
        m = inner


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own (a sibling with the same properties), so that a change of
    its parametrizations never touches a deep copy's (or the original's) class."""
    if not parametrize.is_parametrized(module):
        return
    cls = module.__class__
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def index_of(module: nn.Module, name: str, kind: type) -> int | None:
    """Position of the first parametrization of type ``kind`` in the chain of ``module.<name>``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((i for i, p in enumerate(module.parametrizations[name]) if isinstance(p, kind)), None)


def install_fast_getter(module: nn.Module, name: str) -> None:
    """Replace parametrize's property for ``name`` (on the module's own class) by a shorter path.

    For a chain of one parametrization and outside ``parametrize.cached()`` it calls the parametrization directly,
    skipping ``ParametrizationList.forward`` (which builds a new ModuleList for ``self[1:]`` on every access): this
    halves the Python cost of reading the weight, which is what a cached eval-mode forward pays. Any other case goes
    through parametrize's own getter; the setter is unchanged.
    """
    cls = type(module)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or not isinstance(getattr(parametrize, "_cache_enabled", None), int):
        return
    slow = getattr(prop.fget, "_finereg_slow", prop.fget)

    def get(self):
        plist = self._modules["parametrizations"]._modules[name]
        original = plist._parameters.get("original")
        if original is not None and len(plist._modules) == 1 and not parametrize._cache_enabled:
            return plist._modules["0"](original)
        return slow(self)

    get._finereg_slow = slow
    setattr(cls, name, property(get, prop.fset, prop.fdel, prop.__doc__))


def register(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """``register_parametrization`` on a class of the module's own, with the fast getter."""
    own_class(module)
    parametrize.register_parametrization(module, name, parametrization)
    install_fast_getter(module, name)


def remove(module: nn.Module, name: str) -> None:
    """``remove_parametrizations(..., leave_parametrized=True)`` on a class of the module's own: the parameter keeps
    the current effective value."""
    own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
