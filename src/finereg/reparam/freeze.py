"""Exact partial freezing of a parameter: chosen entries (or output units) never change.

``freeze(module, "weight", frozen)`` registers a ``torch.nn.utils.parametrize`` parametrization

    weight = where(mask, values, original)

with ``mask`` (bool, the parameter's shape, True = frozen) and ``values`` (the frozen values) as buffers.
Frozen entries of ``weight`` are read from the buffer, so they stay bit-identical whatever an optimizer
does to ``original`` (weight decay, momentum from earlier steps, Adam's moments all move the frozen
entries of ``original``, and none of it shows). The gradient w.r.t. ``original`` is exactly the gradient
of ``weight`` at trainable entries and 0 at frozen ones, so trainable entries get exactly the update they
would get without freezing (every torch optimizer here is element-wise). The buffers travel in
``state_dict``. The parameter object is kept (now ``module.parametrizations.weight.original``), so an
optimizer built before ``freeze`` keeps working. (Why not ``requires_grad`` or a gradient hook:
docs/weight_groups.md.)

``frozen`` is a bool mask of the parameter's shape, or a sequence of output-unit indices: rows of dim 0
(Linear / Conv out channels, embedding rows, bias entries). For ConvTranspose weights (in, out/groups, k...)
the output units are the output channels: unit o = g·out/groups + j is the slice ``W[g·in_g:(g+1)·in_g, j]``
(the row o of :func:`finereg.weight.groups.matrix_view`).

Other parametrizations on the same tensor (e.g. weight standardization): freezing fixes the value at its
place in the chain. Registered *after* another parametrization (the usual case: freeze last), the effective
weight's frozen entries are bit-identical. Registered *before* one, the frozen entries of its input are
fixed; for a per-output-unit reparametrization such as standardization, the effective weight of whole
frozen units is then fixed too, but entries of a partly frozen unit move with that unit's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._checks import FineregError, FineregIndexError, FineregTypeError, check_type
from .._utils import get_submodule, unknown_name_error, unwrap
from ..weight.groups import matrix_to_weight, matrix_view
from ._parametrize import index_of, refuse_ddp, register, remove

__all__ = ["PartialFreeze", "freeze", "unfreeze", "frozen_mask"]


class PartialFreeze(nn.Module):
    """Parametrization ``X ↦ where(mask, values, X)``: entries under ``mask`` read the buffer ``values``.

    No ``right_inverse``: assigning ``module.weight = T`` sets the trainable entries to T and leaves the
    frozen ones as they are.
    """

    def __init__(self, mask: Tensor, values: Tensor):
        super().__init__()
        if mask.dtype != torch.bool or mask.shape != values.shape:
            raise FineregError("PartialFreeze needs a bool mask of the same shape as values")
        self.register_buffer("mask", mask.clone())
        self.register_buffer("values", values.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(self.mask, self.values, x)

    @property
    def n_frozen(self) -> int:
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"frozen={self.n_frozen}/{self.mask.numel()}"


def _resolve(module: nn.Module, name: str, what: str | None = None) -> tuple[nn.Module, str]:
    check_type(module, "module", nn.Module, "an nn.Module")
    if not isinstance(name, str) or not name:
        raise FineregTypeError(f"name must be a tensor name such as 'weight' or 'conv.weight', got {name!r}")
    if what is not None:
        refuse_ddp(module, what)
    module = unwrap(module)
    if "." in name:
        sub, name = name.rsplit(".", 1)
        module = get_submodule(module, sub)
    return module, name


def _tensor_names(module: nn.Module) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())
    return names


def _param(module: nn.Module, name: str) -> Tensor:
    is_param = name in dict(module.named_parameters(recurse=False)) or parametrize.is_parametrized(module, name)
    if not is_param:
        raise unknown_name_error("parameter", name, _tensor_names(module), hint=f"on {type(module).__name__}")
    return getattr(module, name)


def _units_mask(module: nn.Module, name: str, like: Tensor, units) -> Tensor:
    try:
        idx = torch.as_tensor(units)
    except (TypeError, ValueError, RuntimeError) as e:
        raise FineregTypeError(
            f"frozen must be a bool mask or a sequence of output-unit indices, got {type(units).__name__}"
        ) from e
    if idx.dim() != 1 or (idx.numel() and (idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex())):
        raise FineregTypeError(
            f"output-unit indices must be a 1-D sequence of ints, got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = idx.long()
    if like.dim() == 1:
        n_units, mat = like.shape[0], torch.zeros(like.shape[0], 1, dtype=torch.bool, device=like.device)
    else:
        mat = torch.zeros(matrix_view(like, module, name).shape, dtype=torch.bool, device=like.device)
        n_units = mat.shape[0]
    bad = idx[(idx < -n_units) | (idx >= n_units)]
    if bad.numel():
        raise FineregIndexError(
            f"output-unit index {int(bad[0])} is out of range for {name} with {n_units} output units "
            f"(valid: 0..{n_units - 1}, or negative from the end)"
        )
    mat[idx.to(like.device)] = True
    return mat.reshape(like.shape) if like.dim() == 1 else matrix_to_weight(mat, like, module, name)


def _make_mask(module: nn.Module, name: str, like: Tensor, frozen) -> Tensor:
    if isinstance(frozen, Tensor) and frozen.dtype == torch.bool:
        if frozen.shape != like.shape:
            raise FineregError(
                f"frozen mask has shape {tuple(frozen.shape)} but {name} has shape {tuple(like.shape)}; "
                "pass a bool mask of the parameter's shape, or a list of output-unit indices"
            )
        return frozen.to(like.device)
    if isinstance(frozen, Tensor) and frozen.shape == like.shape and like.dim() > 1:
        raise FineregTypeError(
            f"frozen mask must have dtype torch.bool (True = frozen), got {frozen.dtype}; "
            "use mask.bool() (or mask != 0)"
        )
    if isinstance(frozen, Tensor) and frozen.is_floating_point():
        raise FineregTypeError(
            f"frozen must be a bool mask or integer output-unit indices, got a {frozen.dtype} tensor"
        )
    if not isinstance(frozen, (Tensor, Sequence, range)) or isinstance(frozen, str):
        raise FineregTypeError(
            f"frozen must be a bool mask of the parameter's shape or a sequence of output-unit indices, "
            f"got {type(frozen).__name__}"
        )
    return _units_mask(module, name, like, frozen)


def _stage_input(module: nn.Module, name: str, index: int) -> Tensor:
    """The value entering parametrization number ``index`` of ``module.name``'s chain."""
    plist = module.parametrizations[name]
    x = plist.original
    for p in list(plist)[:index]:
        x = p(x)
    return x


def freeze(module: nn.Module, name: str, frozen) -> nn.Module:
    """Freeze part of ``module.<name>``: the entries under ``frozen`` keep their current values exactly.

    Args:
        module: the module holding the parameter (a ``torch.compile`` wrapper is looked through; freeze before
            wrapping in DistributedDataParallel).
        name: the parameter's name, e.g. ``"weight"``, or a dotted path from ``module`` (``"conv.weight"``).
        frozen: bool tensor of the parameter's shape (True = frozen), or a sequence of output-unit indices
            (dim 0; ConvTranspose weights: output channels, see the module docstring). Negative indices
            count from the end.

    Calling ``freeze`` again on a frozen tensor adds to the frozen set (the newly frozen entries keep their
    current values). Returns the module that holds the parameter.
    """
    module, name = _resolve(module, name, "freeze")
    current = _param(module, name)
    mask = _make_mask(module, name, current, frozen)
    i = index_of(module, name, PartialFreeze)
    if i is not None:  # extend the frozen set of the existing parametrization
        with torch.no_grad():
            p = module.parametrizations[name][i]
            p.values.copy_(p(_stage_input(module, name, i)))
            p.mask |= mask
        return module
    with torch.no_grad():
        values = current.detach().clone()
    register(module, name, PartialFreeze(mask, values))
    return module


def unfreeze(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove the freezing of ``module.<name>``, keeping the current effective weight.

    The frozen values are written into the underlying parameter (the same ``nn.Parameter`` object, so an
    optimizer keeps working; its state for the formerly frozen entries — momentum, Adam moments — is what
    the optimizer accumulated meanwhile). Other parametrizations on the tensor stay. If freezing sits after
    other parametrizations, they need a ``right_inverse`` to write the frozen values through them.
    """
    module, name = _resolve(module, name, "unfreeze")
    _param(module, name)
    i = index_of(module, name, PartialFreeze)
    if i is None:
        raise FineregError(f"{type(module).__name__}.{name} is not frozen (no PartialFreeze parametrization)")
    plist = module.parametrizations[name]
    if len(plist) == 1:
        remove(module, name)
        return module
    with torch.no_grad():
        value = plist[i](_stage_input(module, name, i))  # what the freezing stage outputs now
        for inner in reversed(list(plist)[:i]):
            if not hasattr(inner, "right_inverse"):
                raise FineregError(
                    f"cannot unfreeze {type(module).__name__}.{name}: freezing sits after {type(inner).__name__}, "
                    "which has no right_inverse to write the frozen values through. Remove the other "
                    "parametrizations first (torch.nn.utils.parametrize.remove_parametrizations(module, name) "
                    "keeps the effective weight), or freeze before registering them"
                )
            value = inner.right_inverse(value)
            if not isinstance(value, Tensor):
                raise FineregError(
                    f"{type(inner).__name__}.right_inverse returns several tensors; cannot unfreeze through it"
                )
        plist.original.copy_(value)
    del plist[i]
    return module


def frozen_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The bool mask of the frozen entries of ``module.<name>`` (a copy), or None if it is not frozen."""
    module, name = _resolve(module, name)
    _param(module, name)
    i = index_of(module, name, PartialFreeze)
    return None if i is None else module.parametrizations[name][i].mask.clone()
