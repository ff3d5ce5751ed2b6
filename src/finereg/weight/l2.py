"""L2 and L2-SP weight penalties, as a loss term or fused straight into ``.grad``.

L2-SP: Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018. The fine-tuned weights w_S of the layers shared with the source model are pulled
towards their starting point w0 (the pretrained weights); the weights that are new in the target (a new
classifier head) get plain weight decay::

    Ω(w) = α/2 · ‖w_S − w0_S‖²  +  β/2 · ‖w_new‖²

L2 (:class:`L2`) is the second term alone over the chosen parameters: Ω(w) = factor/2 · ‖w‖². L2-SP keeps the
paper's two coefficients α and β (README, Conventions); every other single-coefficient weight penalty calls its
coefficient ``factor``.

Two ways to apply the same penalty (the gradients agree to rounding, tested to 1e-6):

(a) a loss term: ``loss = task_loss + reg()``; ``reg()`` is a differentiable scalar (tllib's value and
    gradient with α = β = 1);
(b) fused: ``loss.backward(); reg.add_grad_(); optimizer.step()``. ``add_grad_`` adds ∂Ω/∂w, i.e.
    α·(w − w0) (and β·w for new parameters), straight into ``.grad`` with multi-tensor ``torch._foreach_*``
    ops under ``torch.no_grad()``: no autograd graph, no per-parameter Python loop on the hot path.
    With a ``GradScaler``, call ``scaler.unscale_(optimizer)`` first (or pass ``scale=scaler.get_scale()``).
    With ``DistributedDataParallel`` call it after ``backward()`` (the gradients are already averaged, and
    ∂Ω/∂w is the same on every rank), so the result equals mode (a).

Names. Parameters are matched to anchors by name, after dropping wrapper prefixes on both sides
(``module.`` of DDP / DataParallel, ``_orig_mod.`` of ``torch.compile``) and reading a parametrized
tensor's ``X.parametrizations.weight.original`` as ``X.weight``, so a wrapped, compiled or partially frozen
model matches a plain source model or its ``state_dict``.

The regularizer holds the model's parameter objects, as an optimizer does (``model.to(...)`` and
``load_state_dict`` keep them; rebuild the regularizer if you replace parameter objects). Anchors are
buffers: they are in ``state_dict()``, follow ``reg.to(device/dtype)``, and if the model was moved and the
regularizer was not, each anchor moves to its parameter's device and dtype on the next call.

Frozen parameters (``requires_grad=False``) are skipped by default (``skip_frozen=True``), checked at every
call, so gradual unfreezing works: a frozen weight's penalty is a constant that would only shift the
logged value, and the fused mode must not create a ``.grad`` an optimizer would then apply
(``skip_frozen=False`` counts them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, UnknownNameError, check_bool, check_choice, check_number
from .._deprecate import renamed
from .._select import Patterns, select_names
from .._utils import close_matches, strip_prefixes, unwrap

__all__ = ["L2", "L2SP", "canonical_name"]

Anchor = nn.Module | Mapping[str, Tensor] | None

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def canonical_name(name: str) -> str:
    """A parameter name as matched against anchors: wrapper prefixes dropped, parametrizations read through.

    ``module._orig_mod.layer1.0.conv1.weight`` → ``layer1.0.conv1.weight``;
    ``fc.parametrizations.weight.original`` → ``fc.weight``.
    """
    return _PARAMETRIZED.sub(r"\1\2", strip_prefixes(name))


def _named_params(model: nn.Module, what: str) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise FineregTypeError(f"{what} must be an nn.Module, got {type(model).__name__}")
    out: dict[str, Tensor] = {}
    for name, p in unwrap(model).named_parameters():
        out.setdefault(canonical_name(name), p)
    return out


def _anchor_tensors(anchor: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(anchor, nn.Module):
        return _named_params(anchor, "anchor")
    if isinstance(anchor, Mapping):
        out = {}
        for name, t in anchor.items():
            if not isinstance(t, Tensor):
                raise FineregTypeError(
                    f"anchor[{name!r}] is a {type(t).__name__}, not a tensor; pass a model or a state_dict"
                )
            out.setdefault(canonical_name(str(name)), t)
        return out
    raise FineregTypeError(
        f"anchor must be a source model, a state_dict (name → tensor) or None (snapshot the model), "
        f"got {type(anchor).__name__}"
    )


def _chosen(names: list[str], include: Patterns, exclude: Patterns) -> list[str]:
    """The parameter names kept by the ``include`` / ``exclude`` glob patterns, in model order."""
    if not names:
        raise FineregError("the model has no parameters to regularize")
    chosen = select_names(names, include, "include", "parameter") if include is not None else names
    dropped = set(select_names(names, exclude, "exclude", "parameter"))
    chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        raise FineregError(f"include={include!r} / exclude={exclude!r} leave no parameter of the model to regularize")
    return chosen


def _buffer_name(name: str) -> str:
    return name.replace(".", "/")  # buffer names cannot hold '.'; '/' never occurs in a module path


def _by_device_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): multi-tensor kernels and ``stack`` need one of each."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


class _HalfSquaredDistance(torch.autograd.Function):
    """c/2 · Σ_i ‖p_i − a_i‖² (``anchors`` None: c/2 · Σ_i ‖p_i‖²), gradient c·(p_i − a_i).

    Autograd of the same expression would keep a graph of ~3 nodes per tensor; here the forward is one
    ``_foreach_sub`` + ``_foreach_norm`` and the backward one in-place ``_foreach_mul_`` of the saved
    differences (``benchmarks/bench_l2sp_fused.py`` measures it).
    First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, coef: float, anchors: list[Tensor] | None, *params: Tensor) -> Tensor:
        diffs = torch._foreach_sub(params, anchors) if anchors is not None else list(params)
        total = None
        for idx in _by_device_dtype(diffs):
            s = torch.stack(torch._foreach_norm([diffs[i] for i in idx])).square().sum()
            total = s if total is None else total + s.to(total)
        ctx.coef, ctx.owned = coef, anchors is not None
        ctx.save_for_backward(*diffs)
        return total * (0.5 * coef)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        diffs = list(ctx.saved_tensors)
        scale = grad * ctx.coef
        out: list[Tensor | None] = [None] * len(diffs)
        for idx in _by_device_dtype(diffs):
            ds = [diffs[i] for i in idx]
            sc = scale.to(device=ds[0].device, dtype=ds[0].dtype)
            if ctx.owned:  # our own temporaries: scale them in place and hand them over
                torch._foreach_mul_(ds, sc)
            else:
                ds = torch._foreach_mul(ds, sc)
            for i, d in zip(idx, ds):
                out[i] = d
        needs = ctx.needs_input_grad[2:]
        return (None, None, *(g if n else None for g, n in zip(out, needs)))


class _WeightPenalty(nn.Module):
    """Shared machinery: anchored parameters (pulled to an anchor buffer) and unanchored ones (pulled to 0)."""

    def __init__(
        self,
        anchored: list[tuple[str, Tensor, Tensor]],
        unanchored: list[tuple[str, Tensor]],
        alpha: float,
        beta: float,
        skip_frozen: bool,
    ):
        super().__init__()
        check_bool(skip_frozen, "skip_frozen")
        self.alpha, self.beta, self.skip_frozen = alpha, beta, skip_frozen
        self.anchors = nn.Module()  # buffers: in state_dict, follow .to()
        for name, _, a in anchored:
            self.anchors.register_buffer(_buffer_name(name), a.detach().clone())
        self._buffer_names = [_buffer_name(n) for n, _, _ in anchored]
        # Plain lists: the model's parameters are held (like an optimizer), not registered as ours.
        self._anchored_names = [n for n, _, _ in anchored]
        self._anchored_params = [p for _, p, _ in anchored]
        self._unanchored_names = [n for n, _ in unanchored]
        self._unanchored_params = [p for _, p in unanchored]

    # -- introspection ------------------------------------------------------------------------------------
    @property
    def anchored_names(self) -> list[str]:
        """Canonical names of the parameters pulled towards an anchor (coefficient α)."""
        return list(self._anchored_names)

    @property
    def unanchored_names(self) -> list[str]:
        """Canonical names of the parameters pulled towards 0 (coefficient β for L2-SP, α for L2)."""
        return list(self._unanchored_names)

    def anchor(self, name: str) -> Tensor:
        """The anchor buffer of parameter ``name`` (canonical name)."""
        name = canonical_name(name)
        if name not in self._anchored_names:
            near = close_matches(name, self._anchored_names)
            raise UnknownNameError(
                f"no anchor for {name!r}" + (f"; did you mean one of: {', '.join(map(repr, near))}?" if near else "")
            )
        return self.anchors.get_buffer(_buffer_name(name))

    # -- the two modes ------------------------------------------------------------------------------------
    def _anchor_list(self) -> list[Tensor]:
        buffers = self.anchors._buffers
        anchors = [buffers[b] for b in self._buffer_names]
        for i, (p, a) in enumerate(zip(self._anchored_params, anchors)):
            if a.device != p.device or a.dtype != p.dtype:  # the model was moved, we were not: follow it once
                a = a.to(device=p.device, dtype=p.dtype)
                buffers[self._buffer_names[i]] = a
                anchors[i] = a
        return anchors

    def _active(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(anchored params, their anchors, unanchored params), frozen ones left out if ``skip_frozen``."""
        anchors = self._anchor_list()
        pa, aa = self._anchored_params, anchors
        pu = self._unanchored_params
        if self.skip_frozen:
            keep = [i for i, p in enumerate(pa) if p.requires_grad]
            if len(keep) != len(pa):
                pa, aa = [pa[i] for i in keep], [aa[i] for i in keep]
            pu = [p for p in pu if p.requires_grad]
        return pa, aa, pu

    def forward(self) -> Tensor:
        """The penalty α/2·Σ‖w − w0‖² + β/2·Σ‖w‖² as a differentiable scalar (mode a)."""
        pa, aa, pu = self._active()
        total = None
        if pa and self.alpha:
            total = _HalfSquaredDistance.apply(self.alpha, aa, *pa)
        if pu and self.beta:
            s = _HalfSquaredDistance.apply(self.beta, None, *pu)
            total = s if total is None else total + s.to(total)
        if total is None:  # everything frozen, or coefficients 0
            ref = (self._anchored_params or self._unanchored_params)[0]
            total = ref.new_zeros(())
        return total

    @torch.no_grad()
    def value(self) -> Tensor:
        """The penalty without an autograd graph (for logging in the fused mode)."""
        return self.forward()

    @torch.no_grad()
    def add_grad_(self, scale: float = 1.0) -> None:
        """Add ∂Ω/∂w = α·(w − w0) (anchored) and β·w (unanchored), times ``scale``, into each ``w.grad`` (mode b).

        Call after ``loss.backward()`` and before ``optimizer.step()``. A parameter whose ``.grad`` is None
        gets a new ``.grad``; parameters with ``requires_grad=False`` are never touched.
        """
        check_number(scale, "scale")
        pa, aa, pu = self._active()
        pa_i = [i for i, p in enumerate(pa) if p.requires_grad]  # never create a grad on a frozen tensor
        if len(pa_i) != len(pa):
            pa, aa = [pa[i] for i in pa_i], [aa[i] for i in pa_i]
        pu = [p for p in pu if p.requires_grad]
        ca, cu = self.alpha * scale, self.beta * scale
        if pa and ca:
            _add_into_grads(pa, torch._foreach_sub(pa, aa), ca, fresh=True)
        if pu and cu:
            _add_into_grads(pu, pu, cu, fresh=False)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta={self.beta:g}, anchored={len(self._anchored_names)}, "
            f"unanchored={len(self._unanchored_names)}, skip_frozen={self.skip_frozen}"
        )


def _add_into_grads(params: list[Tensor], terms: list[Tensor], coef: float, fresh: bool) -> None:
    """``p.grad += coef · term`` for every p (multi-tensor); ``p.grad = coef · term`` where ``.grad`` is None.

    ``fresh``: the terms are temporaries we own (may be scaled in place and become a new ``.grad``).
    """
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    if len(with_grad) == len(params):
        torch._foreach_add_([p.grad for p in params], terms, alpha=coef)
        return
    if with_grad:
        torch._foreach_add_([params[i].grad for i in with_grad], [terms[i] for i in with_grad], alpha=coef)
    missing = set(range(len(params))) - set(with_grad)
    for i in sorted(missing):  # rare (a parameter the loss did not use): one tensor op each
        params[i].grad = terms[i].mul_(coef) if fresh else terms[i].mul(coef)


class L2SP(_WeightPenalty):
    """L2-SP: pull fine-tuned weights towards their starting point, plain L2 on the new ones.

    ``Ω(w) = α/2 · Σ_anchored ‖w − w0‖²  +  β/2 · Σ_unanchored ‖w‖²`` (Li et al., ICML 2018).

    Args:
        model: the model being fine-tuned (may be wrapped in DDP / DataParallel or ``torch.compile``d).
        anchor: the starting point w0: the source (pretrained) model, or its ``state_dict`` (name → tensor),
            or ``None`` to snapshot ``model``'s own parameters now (call before training). Copied at
            construction (a detached clone, which later edits of the source do not move).
        alpha: α, the coefficient of the pull towards the anchors (default 1.0: tllib's value).
        beta: β, the coefficient of plain L2 on parameters without an anchor (default: same as ``alpha``).
        include: glob patterns (``fnmatch`` on canonical names, e.g. ``"layer4.*"``); only matching parameters
            are penalized (default: all).
        exclude: glob patterns of parameters to leave out (e.g. ``"*.bn*"``, ``"*.bias"``).
        new_params: glob patterns of parameters that are new in the target although the anchor holds a tensor
            of that name (a replaced classifier head ``"fc.*"`` of another size): treated as unanchored.
        unanchored: what happens to a penalized parameter with no anchor: ``"l2"`` (β/2·‖w‖², the paper),
            ``"ignore"`` (left out) or ``"error"`` (raise, listing them).
        skip_frozen: leave out parameters with ``requires_grad=False`` (checked at every call).

    Raises:
        ValueError: nothing matched between the model and the anchor, or anchored shapes differ (both list
            the names), or a bad coefficient / option.
        KeyError: an include/exclude/new_params pattern that matches nothing (lists close names), or
            ``unanchored="error"`` with parameters that have no anchor.

    Example::

        reg = L2SP(model, anchor=pretrained, alpha=0.01, beta=0.01, new_params="fc.*")
        loss = ce(model(x), y) + reg()                               # (a) as a loss term
        # or: ce(model(x), y).backward(); reg.add_grad_(); opt.step() # (b) fused into .grad
    """

    def __init__(
        self,
        model: nn.Module,
        anchor: Anchor = None,
        *,
        alpha: float = 1.0,
        beta: float | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        new_params: Patterns = None,
        unanchored: Literal["l2", "ignore", "error"] = "l2",
        skip_frozen: bool = True,
    ):
        alpha = check_number(alpha, "alpha", low=0)
        beta = alpha if beta is None else check_number(beta, "beta", low=0)
        check_choice(unanchored, "unanchored", ("l2", "ignore", "error"))
        params = _named_params(model, "model")
        names = list(params)
        chosen = _chosen(names, include, exclude)
        new = set(select_names(names, new_params, "new_params", "parameter"))

        anchors = (
            {n: p for n, p in params.items()}
            if anchor is None or anchor is model or (isinstance(anchor, nn.Module) and unwrap(anchor) is unwrap(model))
            else _anchor_tensors(anchor)
        )
        anchored, missing, bad_shape = [], [], []
        for n in chosen:
            if n in new or n not in anchors:
                missing.append(n)
            elif anchors[n].shape != params[n].shape:
                bad_shape.append(f"{n}: model {tuple(params[n].shape)} vs anchor {tuple(anchors[n].shape)}")
            else:
                anchored.append((n, params[n], anchors[n]))
        if bad_shape:
            raise FineregError(
                "anchor tensors have a different shape than the model's parameters of the same name:\n  "
                + "\n  ".join(bad_shape)
                + "\nA replaced layer (e.g. a new classifier head) is new: pass "
                "new_params=[...] with its names to give it plain L2, or exclude=[...] to leave it out"
            )
        if not anchored and anchor is not None:
            an = list(anchors)
            raise FineregError(
                "no parameter of the model matched a tensor of the anchor by name.\n  model: "
                + ", ".join(chosen[:8])
                + (" ..." if len(chosen) > 8 else "")
                + "\n  anchor: "
                + (", ".join(an[:8]) + (" ..." if len(an) > 8 else "") if an else "(empty)")
                + "\nPass the source model (or its state_dict) whose parameter names are the model's "
                "(wrapper prefixes 'module.' / '_orig_mod.' are ignored on both sides)"
            )
        if missing and unanchored == "error":
            lines = []
            for n in missing[:10]:
                near = close_matches(n, list(anchors), n=3)
                lines.append(f"{n}" + (f" (anchor has: {', '.join(near)})" if near else ""))
            raise UnknownNameError(
                "no anchor for these parameters: "
                + "; ".join(lines)
                + (" ..." if len(missing) > 10 else "")
                + ". Use unanchored='l2' to give them plain L2, or 'ignore' / exclude=[...] to leave them out"
            )
        unanch = [(n, params[n]) for n in missing] if unanchored == "l2" else []
        if not anchored and not unanch:
            raise FineregError("no parameter is left to regularize (all unanchored and unanchored='ignore')")
        super().__init__(anchored, unanch, alpha, beta, skip_frozen)


class L2(_WeightPenalty):
    """Plain L2 penalty ``Ω(w) = factor/2 · Σ ‖w‖²`` over the chosen parameters (tllib's L2Regularization with
    factor = 1).

    The fused mode ``add_grad_()`` adds factor·w to each ``.grad``, i.e. classic (coupled) weight decay restricted
    to the chosen parameters.

    Args:
        model: the model (DDP / DataParallel / ``torch.compile`` wrappers are fine).
        factor: the coefficient (default 1.0; Keras' name for a regularizer's single coefficient).
        include / exclude: glob patterns on canonical parameter names (see :class:`L2SP`).
        skip_frozen: leave out parameters with ``requires_grad=False`` (checked at every call).
    """

    @renamed(alpha="factor", since="0.2")
    def __init__(
        self,
        model: nn.Module,
        *,
        factor: float = 1.0,
        include: Patterns = None,
        exclude: Patterns = None,
        skip_frozen: bool = True,
    ):
        factor = check_number(factor, "factor", low=0)
        params = _named_params(model, "model")
        names = list(params)
        chosen = _chosen(names, include, exclude)
        super().__init__([], [(n, params[n]) for n in chosen], factor, factor, skip_frozen)

    @property
    def factor(self) -> float:
        """The coefficient of the penalty."""
        return self.beta

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}, params={len(self._unanchored_names)}, skip_frozen={self.skip_frozen}"
