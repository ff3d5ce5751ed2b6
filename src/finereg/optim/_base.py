"""What every finereg optimizer wrapper shares: anchors, per-parameter state, ``state_dict``, buckets.

A wrapper (:class:`~finereg.optim.SPD`, :class:`~finereg.optim.FTP`, :class:`~finereg.optim.DecoupledL2SP`)
holds a torch optimizer and runs code around its ``step()``: it *is* a ``torch.optim.Optimizer`` (LR schedulers
accept it), its ``param_groups`` are the inner optimizer's own list (a scheduler's ``lr`` change reaches the
inner step), and the wrapper's hyper-parameters are keys of each group (``spd_weight_decay``, ``ftp_k``,
``l2sp_alpha`` ...), so one group may override them, and they ride in ``state_dict()['param_groups']``.

Anchors θ0, one per parameter, resolved once at construction:

* ``None``: the parameters' values when wrapped (the pretrained weights: wrap before training);
* ``"zero"``: θ0 = 0 for every parameter, no copy kept (SPD's parameter-efficient mode);
* a list (or tuple) with one tensor (or ``None`` = no anchor) per parameter, in the optimizer's order (its
  param groups in turn);
* a module or a state dict, matched by name: names come from ``model=`` (the model being trained) or from
  param groups built from ``model.named_parameters()``; wrapper prefixes (``module.``, ``_orig_mod.``) and
  parametrizations are read through (:func:`finereg.weight.canonical_name`). A parameter whose name the anchor
  lacks (a new classifier head) has no anchor; each wrapper says what that means.

``exclude`` (glob patterns on names, or the parameters themselves) leaves parameters to the inner optimizer
alone. A parameter added later (``add_param_group``) is anchored at its value when it first steps.

State. Everything the wrapper keeps per parameter (θ0, FTP's γ, its moments, the previous displacement, step
counts) lives in ``self.state[p]`` and in ``state_dict()`` under the key ``"finereg.<Wrapper>"``, next to the
inner optimizer's own ``state`` / ``param_groups``: ``load_state_dict`` restores both, so a run resumes bit for
bit. A parameter whose ``.grad`` is None is skipped by the wrapper (as by torch's optimizers) and its state stays
its own: state is keyed by the parameter, never by a running counter.

The per-step work runs on buckets of parameters sharing a param group, device, dtype and anchor kind, with
multi-tensor ``torch._foreach_*`` kernels.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_number
from .._utils import close_matches, unwrap
from ..weight.l2 import _anchor_tensors, canonical_name
from ._state import ZERO, check_inner, checked_own, nonfinite

__all__ = ["WrappedOptimizer", "Bucket", "tensor_dots"]

# torch.optim's decorator of every step: no grad, with graph breaks around the update under torch.compile
_use_grad = getattr(_torch_optimizer, "_use_grad_for_differentiable", torch.no_grad())

Anchors = None | str | Sequence[Tensor | None] | Mapping[str, Tensor] | nn.Module


def tensor_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a_i, b_i⟩ for each pair, as one 1-D tensor (same device / dtype lists).

    No multi-tensor kernel sums a tensor with its sign, so the sum is split by sign:
    Σx = 2·Σmax(x, 0) − Σ|x|, two ``_foreach_norm(·, 1)`` over the products (the rounding error is bounded by
    Σ|x|, as for a plain sum).
    """
    prod = torch._foreach_mul(a, b)
    total = torch.stack(torch._foreach_norm(prod, 1))
    torch._foreach_clamp_min_(prod, 0.0)
    return 2 * torch.stack(torch._foreach_norm(prod, 1)) - total


@dataclass
class Bucket:
    """Parameters with a gradient that share a param group, device, dtype and anchor kind (``"tensor"``,
    ``"zero"`` or ``"none"``); ``anchors`` holds θ0 for kind ``"tensor"``."""

    group: dict
    kind: str
    index: int = -1  # the group's position in param_groups
    params: list[Tensor] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)
    anchors: list[Tensor] = field(default_factory=list)

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    def displacement(self) -> list[Tensor]:
        """θ − θ0 for each parameter (new tensors)."""
        if self.kind == "tensor":
            return torch._foreach_sub(self.params, self.anchors)
        return torch._foreach_mul(self.params, 1.0)  # θ0 = 0 (kind "zero"): a copy of θ


def _patterns(value: Any, what: str) -> tuple[list[str], list[Tensor]]:
    """Split ``value`` (a glob, a tensor, or a sequence of both) into patterns and tensors."""
    if value is None:
        return [], []
    if not isinstance(value, (str, Tensor, Iterable)):
        raise FineregTypeError(
            f"{what} must be glob patterns (like 'fc.*'), parameters, or a list of them, got {value!r}"
        )
    items = [value] if isinstance(value, (str, Tensor)) else list(value)
    pats, tensors = [], []
    for it in items:
        if isinstance(it, str):
            pats.append(it)
        elif isinstance(it, Tensor):
            tensors.append(it)
        else:
            raise FineregError(f"{what} must be glob patterns (like 'fc.*') or parameters, got {it!r}")
    return pats, tensors


class WrappedOptimizer(torch.optim.Optimizer):
    """Base of the wrappers (see the module docstring). Subclasses pass ``hyper`` (group key → default) and
    implement ``_before(buckets)`` (returns what ``_after`` needs) and ``_after(buckets, context)``."""

    #: keys of the per-parameter state holding a tensor of the parameter's shape (checked by ``load_state_dict``)
    _param_state: tuple[str, ...] = ("anchor",)
    #: keys holding a floating 0-d tensor, and keys holding an int
    _scalar_state: tuple[str, ...] = ()
    _int_state: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        anchors: Anchors = None,
        *,
        hyper: dict[str, float],
        model: nn.Module | None = None,
        exclude: Any = (),
        new_params: Any = None,
        allow_zero: bool = True,
    ):
        name = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FineregError(
                f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters())), "
                f"got {type(optimizer).__name__}"
            )
        inner = optimizer
        while isinstance(inner, WrappedOptimizer):
            if type(inner) is type(self):
                raise FineregError(f"optimizer is already wrapped in {name}: wrap it once")
            inner = inner.optimizer
        if model is not None and not isinstance(model, nn.Module):
            raise FineregError(f"model must be the nn.Module being trained, got {type(model).__name__}")
        self.optimizer = optimizer
        self._raw_inner_step = inspect.unwrap(type(optimizer).step)  # without torch.optim's hooks and graph breaks
        closure = inspect.signature(self._raw_inner_step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise FineregError(
                f"{name} cannot wrap {type(optimizer).__name__}: its step() needs a closure that re-evaluates the "
                f"loss several times per step, while {name} works around one gradient and one update per step. "
                "Wrap an optimizer that steps on the gradient it is given (SGD, Adam, AdamW ...)"
            )
        self._key = f"finereg.{name}"
        # torch.optim.Optimizer's own set-up (hooks, step profiling) on the inner optimizer's group dicts: the
        # wrapper's hyper-parameters become keys of those dicts, and the list itself is shared.
        self._wrapping = True
        super().__init__(optimizer.param_groups, {**hyper, "differentiable": False})
        self._wrapping = False
        self.param_groups = optimizer.param_groups
        self._excluded: set[int] = set()
        self._allow_zero = allow_zero
        self._zero = isinstance(anchors, str)
        if self._zero and (anchors != ZERO or not allow_zero):
            raise FineregError(
                f"anchors must be None (the values when wrapped), a list of tensors, a model or a state dict"
                f"{', or ' + repr(ZERO) if allow_zero else ''}, got {anchors!r}"
            )
        for i, g in enumerate(self.param_groups):
            self._check_group(g, f"param_groups[{i}]")
        self._init_anchors(anchors, model, exclude, new_params)

    # ---------------------------------------------------------------------------------------- anchors
    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self, model: nn.Module | None) -> list[str | None]:
        by_id: dict[int, str] = {}
        if model is not None:
            for n, p in unwrap(model).named_parameters():
                by_id.setdefault(id(p), canonical_name(n))
        names: list[str | None] = []
        for g in self.param_groups:
            given = g.get("param_names")
            for i, p in enumerate(g["params"]):
                names.append(canonical_name(given[i]) if given is not None else by_id.get(id(p)))
        return names

    def _init_anchors(self, anchors: Anchors, model: nn.Module | None, exclude: Any, new_params: Any) -> None:
        params = self._flat_params()
        names = self._names(model)
        known = [n for n in names if n is not None]
        need_names = "pass model=<the model being trained>, or build the optimizer from model.named_parameters()"

        def select(value: Any, what: str) -> set[int]:
            pats, tensors = _patterns(value, what)
            ids = {id(t) for t in tensors}
            unknown = [t for t in tensors if not any(t is p for p in params)]
            if unknown:
                raise FineregError(f"{what} holds {len(unknown)} tensor(s) that the optimizer does not optimize")
            if pats and len(known) < len(params):
                raise FineregError(f"{what} patterns need parameter names: {need_names}")
            for pat in pats:
                hits = [i for i, n in enumerate(names) if n is not None and fnmatch.fnmatchcase(n, pat)]
                if not hits:
                    near = close_matches(pat, known)
                    hint = f"; did you mean one of: {', '.join(map(repr, near))}?" if near else ""
                    raise FineregError(f"{what} pattern {pat!r} matches no parameter of the optimizer{hint}")
                ids.update(id(params[i]) for i in hits)
            return ids

        self._excluded = select(exclude, "exclude")
        new = select(new_params, "new_params")
        if isinstance(anchors, nn.Module) or isinstance(anchors, Mapping):
            if len(known) < len(params):
                raise FineregError(f"anchors given as a model or state dict are matched by name: {need_names}")
            table = _anchor_tensors(anchors)
            found = {n: table[n] for n in known if n in table}
            if not found:
                raise FineregError(
                    "no parameter name matches a tensor of the anchors: parameters "
                    f"{known[:6]}{' ...' if len(known) > 6 else ''}, anchors "
                    f"{list(table)[:6]}{' ...' if len(table) > 6 else ''}"
                )
            resolved: list[Any] = [found.get(n) for n in names]
        elif isinstance(anchors, (list, tuple)):
            if len(anchors) != len(params):
                raise FineregError(
                    f"anchors must hold one tensor (or None) per parameter of the optimizer, in its order: "
                    f"{len(params)} parameters, got {len(anchors)} anchors"
                )
            resolved = list(anchors)
        elif anchors is None or self._zero:
            resolved = [ZERO if self._zero else p for p in params]
        else:
            raise FineregError(
                "anchors must be None (the values when wrapped), 'zero', a list of tensors, a model or a state "
                f"dict, got {type(anchors).__name__}"
            )
        bad = []
        for i, (p, a) in enumerate(zip(params, resolved)):
            if id(p) in self._excluded:
                continue
            if id(p) in new:
                a = None
            if isinstance(a, Tensor):
                if a.is_meta:
                    raise FineregError(
                        f"the anchor of {names[i] or f'parameter {i}'} is on the meta device (it has no values): "
                        "load the pretrained weights (e.g. model.to_empty(device=...) then load_state_dict) before "
                        "wrapping the optimizer, or pass anchors with values"
                    )
                if a.shape != p.shape:
                    bad.append(f"{names[i] or f'parameter {i}'}: parameter {tuple(p.shape)} vs anchor {tuple(a.shape)}")
                    continue
                a = a.detach().to(device=p.device, dtype=p.dtype, copy=True)
            elif not (a is None or (isinstance(a, str) and a == ZERO)):
                raise FineregError(f"anchors[{i}] must be a tensor or None, got {type(a).__name__}")
            self.state[p]["anchor"] = a
        if bad:
            raise FineregError(
                "anchor shapes differ from the parameters':\n  " + "\n  ".join(bad) + "\nA replaced layer (a new "
                "classifier head) is new: leave it out of the anchors, or name it in new_params / exclude"
            )
        held = [(i, a) for i, p in enumerate(params) if isinstance(a := self.state.get(p, {}).get("anchor"), Tensor)]
        bad_i = [held[j][0] for j in nonfinite([a for _, a in held])]
        if bad_i:
            which = ", ".join(names[i] or f"parameter {i}" for i in bad_i[:6]) + (" ..." if len(bad_i) > 6 else "")
            raise FineregError(
                f"anchors must be finite: the anchor of {which} holds NaN or inf (in the parameter's dtype); "
                "every step would pull the weights towards it. Check the pretrained weights you pass as anchors"
            )

    @property
    def anchored(self) -> list[Tensor]:
        """The parameters with an anchor (θ0 a tensor or zero)."""
        return [p for p in self._flat_params() if self._anchor_of(p) is not None]

    def _anchor_of(self, p: Tensor) -> Tensor | str | None:
        if id(p) in self._excluded:
            return None
        st = self.state[p]
        if "anchor" not in st:  # added after wrapping: anchored at its value now, before its first step
            st["anchor"] = ZERO if self._zero else p.detach().clone()
        return st["anchor"]

    # -------------------------------------------------------------------------------------------- step
    def _hyper(self, group: dict, key: str) -> Any:
        return group.get(key, self.defaults[key])

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        """Every hyper-parameter of the wrapper that ``group`` sets is a finite number >= 0."""
        for key in self.defaults:
            if key != "differentiable" and key in group:
                check_number(group[key], f"{where}[{key!r}]", low=0)

    def _check_groups(self) -> None:
        """The groups' hyper-parameters, checked at each step (a group may have been edited since)."""
        for i, g in enumerate(self.param_groups):
            self._check_group(g, f"param_groups[{i}]")

    def _buckets(self) -> list[Bucket]:
        """The wrapper's parameters that have a gradient, bucketed."""
        out: dict[tuple, Bucket] = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.grad is None or id(p) in self._excluded:
                    continue
                a = self._anchor_of(p)
                kind = "none" if a is None else "zero" if isinstance(a, str) else "tensor"
                b = out.setdefault((gi, p.device, p.dtype, kind), Bucket(g, kind, gi))
                b.params.append(p)
                b.states.append(self.state[p])
                if kind == "tensor":
                    b.anchors.append(a)
        return list(out.values())

    def _before(self, buckets: list[Bucket]) -> Any:
        return None

    def _after(self, buckets: list[Bucket], context: Any) -> None:
        raise NotImplementedError

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: the wrapper's work before, ``optimizer.step()``, the wrapper's work after.

        Under ``torch.compile`` the three are traced as one graph: the inner optimizer's undecorated ``step`` is
        called (its step hooks do not run), inside torch.optim's own no-grad wrapper (its graph breaks make the
        update an inference graph), so that inductor fuses the wrapper's element-wise work into the inner update.
        """
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        context = self._before(buckets)
        if torch.compiler.is_compiling():
            self._raw_inner_step(self.optimizer)
        else:
            self.optimizer.step()
        self._after(buckets, context)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters are anchored at their values when they first step."""
        if getattr(self, "_wrapping", False):  # torch.optim.Optimizer.__init__ adding the inner groups themselves
            return super().add_param_group(param_group)
        if isinstance(param_group, Mapping):
            self._check_group(param_group, "the new param group")
        self.optimizer.add_param_group(param_group)
        self.param_groups = self.optimizer.param_groups
        for k, v in self.defaults.items():
            self.param_groups[-1].setdefault(k, v)

    # ------------------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict()`` plus the wrapper's per-parameter state (θ0 included) under
        ``"finereg.<Wrapper>"``, indexed like torch's ``state``. Tensors are the live ones (as in torch): save it
        (``torch.save``) or copy it before stepping on."""
        out = self.optimizer.state_dict()
        params = self._flat_params()
        own = {i: dict(self.state[p]) for i, p in enumerate(params) if p in self.state and self.state[p]}
        out[self._key] = {"state": own, "zero": self._zero}
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the inner optimizer and the wrapper (θ0, and every piece of the wrapper's state).

        Everything is checked before anything changes (a refused state dict leaves the wrapper and the inner
        optimizer as they were): the wrapper's entry (parameter indices, the shape, dtype and finiteness of θ0 and
        of every state tensor), the param groups (their number and sizes, the wrapper's hyper-parameters) and, for
        torch's element-wise optimizers, the shapes and finiteness of the inner state."""
        if not isinstance(state_dict, Mapping) or self._key not in state_dict:
            found = (
                [k for k in state_dict if isinstance(k, str) and k.startswith("finereg.")]
                if isinstance(state_dict, Mapping)
                else []
            )
            raise FineregError(
                f"state_dict has no {self._key!r} entry: it was not saved by {type(self).__name__}.state_dict()"
                + (f" (it holds {found})" if found else " (a plain optimizer's state dict?)")
            )
        params = self._flat_params()
        zero, loaded = checked_own(self, state_dict[self._key], params)
        check_inner(self, state_dict, params)
        rest = {k: v for k, v in state_dict.items() if k != self._key}
        self.optimizer.load_state_dict(rest)  # a wrapper checks its own part first; torch checks before it writes
        self.param_groups = self.optimizer.param_groups
        self._zero = zero
        for p in params:
            self.state.pop(p, None)
        for i, st in loaded.items():
            self.state[params[i]] = st

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n  ")
        hyper = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({hyper},\n  {inner})"
