"""Checks of a finereg optimizer wrapper's state dict before it loads anything, and the finiteness test.

A state dict is checked whole before ``load_state_dict`` changes anything: the wrapper's entry (parameter indices,
the shape, dtype and finiteness of θ0 and of every state tensor), the param groups (their number and sizes, the
wrapper's hyper-parameters) and, for torch's element-wise optimizers, the inner state's shapes and finiteness.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import FineregError

__all__ = ["nonfinite", "checked_own", "check_inner", "to_param"]

ZERO = "zero"


def nonfinite(tensors: Sequence[Tensor]) -> list[int]:
    """Positions of the tensors holding a NaN or an infinity, with two multi-tensor norms per device (no copy of
    the tensors): the max-norm is infinite where an entry is, the 1-norm NaN exactly where an entry is NaN (a sum
    of |x| that overflows is inf, never NaN). Empty and meta tensors are skipped."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() and not t.is_meta:
            by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        ts = [tensors[i] for i in idx]
        peak = torch.stack(torch._foreach_norm(ts, float("inf")))
        total = torch.stack(torch._foreach_norm(ts, 1))
        flags = (~torch.isfinite(peak) | torch.isnan(total)).tolist()
        bad += [i for i, f in zip(idx, flags) if f]
    return sorted(bad)


def checked_own(opt: Any, own: Any, params: list[Tensor]) -> tuple[bool, dict[int, dict]]:
    """The wrapper ``opt``'s entry of a state dict, checked and converted (fresh tensors on each parameter's device);
    raises a FineregError naming the first problem."""
    what = f"state_dict[{opt._key!r}]"
    if not isinstance(own, Mapping) or not isinstance(own.get("state"), Mapping):
        raise FineregError(f"{what} must be a mapping with a 'state' mapping, as saved by state_dict()")
    zero = own.get("zero", False)
    if not isinstance(zero, bool) or (zero and not opt._allow_zero):
        raise FineregError(f"{what}['zero'] must be {'True or ' if opt._allow_zero else ''}False, got {zero!r}")
    loaded: dict[int, dict] = {}
    labels: list[str] = []
    tensors: list[Tensor] = []
    for key, st in own["state"].items():
        i = _index(key)
        if i is None or not 0 <= i < len(params):
            raise FineregError(
                f"{what} holds state for parameter index {key!r}; indices must be integers in "
                f"0..{len(params) - 1} (the optimizer has {len(params)} parameters)"
            )
        if not isinstance(st, Mapping):
            raise FineregError(f"{what}['state'][{key!r}] must be a mapping, got {type(st).__name__}")
        p = params[i]
        out = {}
        for k, v in st.items():
            here = f"{what}['state'][{i}][{k!r}]"
            if k in opt._param_state:
                if k == "anchor" and (v is None or (zero and isinstance(v, str) and v == ZERO)):
                    out[k] = v
                    continue
                _check_tensor(v, here, p, tuple(p.shape))
            elif k in opt._scalar_state:
                _check_tensor(v, here, p, ())
            elif k in opt._int_state:
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                    raise FineregError(f"{here} must be an integer >= 0, got {v!r}")
            out[k] = to_param(v, p)
            if isinstance(out[k], Tensor) and out[k].is_floating_point():
                labels.append(f"{k!r} of parameter {i}")
                tensors.append(out[k])
        loaded[i] = out
    bad = nonfinite(tensors)
    if bad:
        raise FineregError(
            f"{what} holds NaN or inf (in the parameters' dtypes) in {', '.join(labels[j] for j in bad[:6])}"
            f"{' ...' if len(bad) > 6 else ''}: nothing was loaded; the state dict is damaged or comes from a "
            "diverged run"
        )
    return zero, loaded


def check_inner(opt: Any, state_dict: Mapping[str, Any], params: list[Tensor]) -> None:
    """The param groups of a state dict (number, sizes, the wrapper's hyper-parameters) and, for torch's
    element-wise optimizers, the inner state's shapes and finiteness."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) for g in groups):
        raise FineregError("state_dict['param_groups'] must be a list of group dicts, as saved by state_dict()")
    sizes = [len(g.get("params", ())) for g in groups]
    mine = [len(g["params"]) for g in opt.param_groups]
    if sizes != mine:
        raise FineregError(
            f"state_dict was saved for param groups of {sizes} parameters; this optimizer has {mine}: "
            "build the optimizer as the saved run did (same model, same groups)"
        )
    for i, g in enumerate(groups):
        opt._check_group(g, f"state_dict['param_groups'][{i}]")
    inner = state_dict.get("state", {})
    if not isinstance(opt.optimizer, _ELEMENTWISE) or not isinstance(inner, Mapping):
        return
    labels, tensors = [], []
    for key, st in inner.items():
        i = _index(key)
        if i is None or not 0 <= i < len(params) or not isinstance(st, Mapping):
            raise FineregError(
                f"state_dict['state'] holds an entry {key!r}; keys must be parameter indices in "
                f"0..{len(params) - 1}, each with a mapping"
            )
        for k, v in st.items():
            if not isinstance(v, Tensor):
                continue
            if v.dim() and v.shape != params[i].shape:
                raise FineregError(
                    f"state_dict['state'][{i}][{k!r}] has shape {tuple(v.shape)}, its parameter "
                    f"{tuple(params[i].shape)}: the state was saved for another model"
                )
            if v.is_floating_point():
                labels.append(f"{k!r} of parameter {i}")
                tensors.append(v)
    bad = nonfinite(tensors)
    if bad:
        raise FineregError(
            f"state_dict['state'] holds NaN or inf in {', '.join(labels[j] for j in bad[:6])}"
            f"{' ...' if len(bad) > 6 else ''}: nothing was loaded; the state dict is damaged or comes from a "
            "diverged run"
        )


# torch optimizers whose per-parameter state tensors have the parameter's shape (or are 0-d)
_ELEMENTWISE = tuple(
    getattr(torch.optim, n)
    for n in ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD")
    if hasattr(torch.optim, n)
)


def _index(key: Any) -> int | None:
    """A state dict's parameter index (an int, or a str of one), else None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, numbers.Integral):
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


def _check_tensor(value: Any, where: str, p: Tensor, shape: tuple[int, ...]) -> None:
    """``value`` is a floating tensor of ``shape`` with values (not on the meta device)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.is_meta:
        got = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise FineregError(f"{where} must be a floating-point tensor with values, got {got}")
    if tuple(value.shape) != shape:
        raise FineregError(
            f"{where} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}: the state was saved for "
            "another model (matching the number of parameters is not enough)"
        )


def to_param(value: Any, p: Tensor) -> Any:
    """A loaded state value on the parameter's device (floating tensors in its dtype), as a fresh tensor."""
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=p.device, dtype=p.dtype, copy=True)
    return value.to(device=p.device, copy=True)
