"""Orthogonality penalties on weight matrices and weight groups (rows = output units).

Every penalty is a small ``nn.Module`` with a coefficient. Bound to weight groups at construction
(``SoftOrthogonality(group, factor=1e-4)()``) or called on a matrix / a group (``penalty(W)``), it returns a
scalar: ``factor · Σ over matrices of value(W)``. A group joined along rows/columns contributes one matrix; a
group with ``axis=None`` contributes each member's matrix. All matrices of one call (from all groups) are
bucketed by shape and evaluated batched (one ``bmm`` per shape, e.g. the identical blocks of a ResNet stage).

For W of shape n × m (n output units):

* :class:`Orthogonality` — Keras 3's ``OrthogonalRegularizer``: rows (or columns) L2-normalised,
  P = Ŵ Ŵᵀ, value = ½ Σ_{i≠j} |P_ij| / (n(n−1)/2), i.e. the mean |cosine| between distinct rows.
* :class:`SoftOrthogonality` — SO (Bansal et al. 2018): ‖W Wᵀ − I_n‖²_F.
* :class:`DoubleSoftOrthogonality` — DSO (Bansal et al. 2018): ‖W Wᵀ − I_n‖²_F + ‖Wᵀ W − I_m‖²_F.
* :class:`MutualCoherence` — MC: max_{i≠j} |ŵ_i · ŵ_j| over the L2-normalised rows.
* :class:`SRIP` — SRIP (Bansal et al. 2018): σ(G − I), the spectral norm of the Gram on the smaller side
  minus I, by power iteration with a persistent vector.
* :class:`CallablePenalty` — any user function of a matrix returning a scalar.

Gram on the smaller side: for a tall W (n > m) the n × n Gram W Wᵀ is never formed where the value allows:
‖W Wᵀ − I_n‖²_F = ‖Wᵀ W − I_m‖²_F + (n − m) (both equal tr((WᵀW)²) − 2‖W‖²_F + n), so SO costs
O(min(n,m)² · max(n,m)) and DSO = 2‖G − I_k‖²_F + (K − k) with G the k × k Gram, k = min(n, m),
K = max(n, m). Orthogonality and MC need the n × n cosine matrix itself (absolute values / a max).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_int, check_number
from .._deprecate import renamed, renamed_attribute
from .groups import WeightGroup

__all__ = [
    "GroupPenalty",
    "Orthogonality",
    "SoftOrthogonality",
    "DoubleSoftOrthogonality",
    "MutualCoherence",
    "SRIP",
    "CallablePenalty",
    "create_penalty",
    "keras_orthogonality",
]

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): the norm floor of keras.ops.normalize


def _check_mode(mode: str) -> str:
    if mode not in ("rows", "columns"):
        raise FineregError(f"mode must be 'rows' (output units) or 'columns', got {mode!r}")
    return mode


def _normalize(w: Tensor, dim: int, eps: float = KERAS_EPSILON) -> Tensor:
    """w · 1/max(‖w‖, eps) along ``dim`` — Keras's ``x · min(rsqrt(Σx²), 1/eps)``, with a finite gradient at 0."""
    return w * w.square().sum(dim, keepdim=True).clamp_min(eps * eps).rsqrt()


def _eye_like(k: int, w: Tensor) -> Tensor:
    return torch.eye(k, dtype=w.dtype, device=w.device)


def _gram_small(w: Tensor) -> Tensor:
    """The Gram matrix on the smaller side of each (…, n, m) matrix: W Wᵀ if n ≤ m, else Wᵀ W."""
    return w @ w.mT if w.shape[-2] <= w.shape[-1] else w.mT @ w


class _SoftOrthogonalityFn(torch.autograd.Function):
    """scale · ‖G − I_k‖²_F + c for a batch w (B, n, m), G the k × k Gram on the smaller side, with the
    analytic gradient 4 · scale · (G − I) W (wide) or 4 · scale · W (G − I) (tall): one matmul in the
    backward pass where autograd would do two. scale = 1, c = max(n − m, 0) gives ‖W Wᵀ − I_n‖²_F (SO);
    scale = 2, c = |n − m| gives ‖W Wᵀ − I_n‖²_F + ‖Wᵀ W − I_m‖²_F (DSO). Under create_graph the backward
    is itself differentiable (higher derivatives exact, one extra matmul)."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: float, const: int) -> Tensor:
        d = _gram_small(w)
        d.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        ctx.save_for_backward(w, d)
        ctx.scale = scale
        return scale * d.square().sum((-2, -1)) + const

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, d = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: rebuild G − I from w so higher derivatives are exact
            d = _gram_small(w) - _eye_like(d.shape[-1], w)
        d = d * (4.0 * ctx.scale * grad_out)[:, None, None]
        return (d @ w if w.shape[-2] <= w.shape[-1] else w @ d), None, None


def _cosine_matrix(w: Tensor, mode: str) -> Tensor:
    if mode == "rows":
        u = _normalize(w, -1)
        return u @ u.mT
    u = _normalize(w, -2)
    return u.mT @ u


def keras_orthogonality(w: Tensor, mode: str = "rows") -> Tensor:
    """Keras 3 ``OrthogonalRegularizer`` without its factor, for a matrix or a batch (…, n, m).

    value = ½ Σ_{i≠j} |P_ij| / (k(k−1)/2), P the cosine matrix of the rows (mode="rows", k = n) or of the
    columns (mode="columns", k = m). With k = 1 there are no pairs: Keras returns NaN (0/0), we return 0.
    """
    p = _cosine_matrix(w, _check_mode(mode))
    k = p.shape[-1]
    if k < 2:  # no pairs; keep the graph so that backward() works on a lone row
        return p.sum((-2, -1)) * 0
    off = p * (1.0 - _eye_like(k, p))
    return 0.5 * off.abs().sum((-2, -1)) / (k * (k - 1.0) / 2.0)


def _as_groups(groups) -> list[WeightGroup]:
    if groups is None:
        return []
    if isinstance(groups, (WeightGroup, nn.Module)):
        groups = [groups]
    if not isinstance(groups, Sequence):
        raise FineregTypeError(
            f"groups must be a WeightGroup, a module, or a sequence of them; got {type(groups).__name__}"
        )
    out = []
    for g in groups:
        if isinstance(g, nn.Module):
            g = WeightGroup(g)
        if not isinstance(g, WeightGroup):
            raise FineregTypeError(f"groups must hold WeightGroup objects (or modules), got {type(g).__name__}")
        out.append(g)
    return out


class GroupPenalty(nn.Module):
    """Base class: ``factor · Σ value(W)`` over the matrices of the bound groups or of the call's argument.

    Subclasses implement :meth:`batch_value` mapping a batch of matrices (B, n, m) to their values (B,).
    Call with no argument to use the groups given at construction, or with a 2-D matrix (rows = output
    units), a :class:`WeightGroup`, or a list of them.
    """

    coef = renamed_attribute("coef", "factor", since="0.2")

    @renamed(coef="factor", since="0.2")
    def __init__(
        self, groups: WeightGroup | nn.Module | Sequence[WeightGroup | nn.Module] | None = None, factor: float = 1.0
    ):
        super().__init__()
        self.groups = _as_groups(groups)
        self.factor = check_number(factor, "factor", low=0)

    # -- to implement -------------------------------------------------------------------------------------
    def batch_value(self, w: Tensor, key: str) -> Tensor:  # pragma: no cover - abstract
        """Values (B,) of the matrices w (B, n, m); ``key`` names the bucket (for persistent state)."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------------------
    def _inputs(self, target) -> tuple[list[Tensor], str]:
        if target is None:
            if not self.groups:
                raise FineregError(
                    f"{type(self).__name__} has no groups: construct it with a WeightGroup "
                    "(or a module) or call it on a matrix / WeightGroup"
                )
            return [m for g in self.groups for m in g.penalty_inputs()], "g"
        if isinstance(target, Tensor):
            if target.dim() != 2:
                raise FineregError(
                    f"a penalty takes a 2-D matrix (rows = output units), got shape {tuple(target.shape)}; for a "
                    "layer's weight use WeightGroup(module) or finereg.weight.groups.weight_matrix(module)"
                )
            return [target], "c"
        return [m for g in _as_groups(target) for m in g.penalty_inputs()], "c"

    def _buckets(self, mats: list[Tensor]) -> dict[tuple, list[int]]:
        buckets: dict[tuple, list[int]] = {}
        for i, m in enumerate(mats):
            buckets.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
        return buckets

    def values(self, target=None) -> Tensor:
        """Unscaled value of each matrix, in order (groups in order, members in order)."""
        mats, prefix = self._inputs(target)
        parts, order = [], []
        for (shape, _, _), idx in self._buckets(mats).items():
            batch = torch.stack([mats[i] for i in idx])
            parts.append(self.batch_value(batch, f"{prefix}{len(idx)}_{shape[0]}x{shape[1]}"))
            order.extend(idx)
        out = torch.cat(parts)
        return out[torch.as_tensor(order, device=out.device).argsort()]

    def forward(self, target=None) -> Tensor:
        mats, prefix = self._inputs(target)
        total = None
        for (shape, _, _), idx in self._buckets(mats).items():
            batch = torch.stack([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]].unsqueeze(0)
            v = self.batch_value(batch, f"{prefix}{len(idx)}_{shape[0]}x{shape[1]}").sum()
            total = v if total is None else total + v
        return self.factor * total

    def extra_repr(self) -> str:
        return f"factor={self.factor}, groups={len(self.groups)}"


class Orthogonality(GroupPenalty):
    """Keras 3 ``OrthogonalRegularizer`` over weight groups: mean |cosine| between distinct rows.

    value(W) = ½ Σ_{i≠j} |ŵ_i · ŵ_j| / (n(n−1)/2), ŵ_i = w_i / max(‖w_i‖, 1e-7) (Keras's ``normalize``).

    Args:
        factor: the coefficient, Keras's ``factor`` (Keras default 0.01; here 1.0 like every finereg penalty).
        mode: ``"rows"`` (default): the output units (filters) are pushed apart; ``"columns"``: the columns.
            Our rows are output units; a Keras Dense/Conv kernel stores units in its *last* axis, so Keras's
            ``mode="columns"`` on a Keras kernel equals ``mode="rows"`` here (see ``finereg.compat.keras``).

    A matrix with a single row (mode rows) has no pairs: its value is 0 (docs/weight_groups.md compares with Keras).
    """

    @renamed(coef="factor", since="0.2")
    def __init__(self, groups=None, factor: float = 1.0, mode: Literal["rows", "columns"] = "rows"):
        super().__init__(groups, factor)
        self.mode = _check_mode(mode)

    def batch_value(self, w: Tensor, key: str) -> Tensor:
        return keras_orthogonality(w, self.mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


class SoftOrthogonality(GroupPenalty):
    """Soft orthogonality, SO (Bansal, Chen, Wang, NeurIPS 2018): value(W) = ‖W Wᵀ − I_n‖²_F.

    Computed on the smaller side: for n > m, ‖W Wᵀ − I_n‖²_F = ‖Wᵀ W − I_m‖²_F + (n − m), exact. The
    gradient is the analytic 4 (W Wᵀ − I) W (= 4 W (WᵀW − I) for tall W): one matmul where autograd needs
    two (double backward still works).
    """

    def batch_value(self, w: Tensor, key: str) -> Tensor:
        n, m = w.shape[-2:]
        return _SoftOrthogonalityFn.apply(w, 1.0, max(n - m, 0))


class DoubleSoftOrthogonality(GroupPenalty):
    """Double soft orthogonality, DSO (Bansal et al. 2018): ‖W Wᵀ − I_n‖²_F + ‖Wᵀ W − I_m‖²_F.

    Both terms come from the k × k Gram G on the smaller side (k = min(n, m), K = max(n, m)):
    value = 2‖G − I_k‖²_F + (K − k); gradient 8 (G − I) W or 8 W (G − I), one matmul.
    """

    def batch_value(self, w: Tensor, key: str) -> Tensor:
        n, m = w.shape[-2:]
        return _SoftOrthogonalityFn.apply(w, 2.0, abs(n - m))


class MutualCoherence(GroupPenalty):
    """Mutual coherence, MC (Bansal et al. 2018): value(W) = max_{i≠j} |ŵ_i · ŵ_j|.

    ŵ are the L2-normalised rows (``mode="rows"``, output units) or columns. The gradient flows to the
    single most coherent pair. A single row has no pair: value 0.
    """

    @renamed(coef="factor", since="0.2")
    def __init__(self, groups=None, factor: float = 1.0, mode: Literal["rows", "columns"] = "rows"):
        super().__init__(groups, factor)
        self.mode = _check_mode(mode)

    def batch_value(self, w: Tensor, key: str) -> Tensor:
        p = _cosine_matrix(w, self.mode)
        k = p.shape[-1]
        if k < 2:
            return p.sum((-2, -1)) * 0
        eye = torch.eye(k, dtype=torch.bool, device=p.device)
        return p.abs().masked_fill(eye, 0).amax((-2, -1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


class SRIP(GroupPenalty):
    """Spectral restricted isometry property regularizer, SRIP (Bansal et al. 2018).

    value(W) = σ(G − I_k), the spectral norm of the Gram on the smaller side (k = min(n, m): W Wᵀ when
    n ≤ m, else Wᵀ W, as in the authors' code) minus the identity; ``squared=True`` gives σ², the value the
    authors' code returns (their paper writes σ).

    σ is estimated by power iteration on the symmetric A = G − I without forming G (A v = W(Wᵀv) − v, or
    Wᵀ(Wv) − v): a persistent unit vector per matrix (a buffer, saved in ``state_dict``) takes
    ``n_power_iterations`` steps v ← A v / ‖A v‖ per call in training mode (none in eval mode, except for
    a vector just created), then σ = ‖A v‖ with v held constant, whose gradient is that of σ once v has
    converged (as in ``torch.nn.utils.parametrizations.spectral_norm``). The authors' code restarts from a random
    vector each step instead (docs/weight_groups.md).
    """

    @renamed(coef="factor", since="0.2")
    def __init__(
        self, groups=None, factor: float = 1.0, n_power_iterations: int = 1, squared: bool = False, eps: float = 1e-12
    ):
        super().__init__(groups, factor)
        check_int(n_power_iterations, "n_power_iterations", low=0)
        self.n_power_iterations = n_power_iterations
        self.squared = bool(squared)
        self.eps = float(eps)

    @staticmethod
    def _apply(w: Tensor, v: Tensor) -> Tensor:
        """A v for A = (smaller-side Gram of w) − I; w (B, n, m), v (B, k)."""
        vc = v.unsqueeze(-1)
        if w.shape[-2] <= w.shape[-1]:
            av = w @ (w.mT @ vc)
        else:
            av = w.mT @ (w @ vc)
        return av.squeeze(-1) - v

    def _unit(self, v: Tensor) -> Tensor:
        return v / v.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    def _vector(self, key: str, w: Tensor) -> tuple[Tensor, bool]:
        name = f"u_{key}"
        want = (w.shape[0], min(w.shape[-2:]))
        v = getattr(self, name, None)
        if v is not None and tuple(v.shape) == want:
            return v, False
        v = self._unit(torch.randn(want, dtype=w.dtype, device=w.device))
        self.register_buffer(name, v)
        return v, True

    def batch_value(self, w: Tensor, key: str) -> Tensor:
        v, fresh = self._vector(key, w)
        with torch.no_grad():
            u = v.to(w.dtype)
            if (self.training or fresh) and self.n_power_iterations:  # a new vector iterates even in eval
                wd = w.detach()
                for _ in range(self.n_power_iterations):
                    u = self._unit(self._apply(wd, u))
                v.copy_(u)
        sigma = self._apply(w, u.clone()).norm(dim=-1)
        return sigma.square() if self.squared else sigma

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # vectors are created lazily (one per bucket of matrices): accept the saved ones
        for k, v in state_dict.items():
            if k.startswith(prefix + "u_") and "." not in k[len(prefix) :]:
                name = k[len(prefix) :]
                if getattr(self, name, None) is None or tuple(getattr(self, name).shape) != tuple(v.shape):
                    self.register_buffer(name, torch.empty_like(v))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_power_iterations={self.n_power_iterations}, squared={self.squared}"


class CallablePenalty(GroupPenalty):
    """Any user function ``fn(matrix) -> scalar tensor``, applied to each matrix and summed, times factor.

    ``fn`` gets a 2-D matrix with one row per output unit (a joined group's matrix, or each member's).
    E.g. ``Σ K ∘ K[::-1]`` on a Keras kernel: ``CallablePenalty(lambda w: (w * w.flip(0)).sum(), g)``.
    """

    @renamed(coef="factor", since="0.2")
    def __init__(self, fn: Callable[[Tensor], Tensor], groups=None, factor: float = 1.0):
        if not callable(fn):
            raise FineregTypeError(f"fn must be callable (matrix -> scalar tensor), got {type(fn).__name__}")
        super().__init__(groups, factor)
        self.fn = fn

    def _one(self, m: Tensor) -> Tensor:
        v = self.fn(m)
        if not isinstance(v, Tensor) or v.numel() != 1:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise FineregTypeError(f"the penalty function must return a scalar tensor, got {got}")
        return v.reshape(())

    def values(self, target=None) -> Tensor:
        mats, _ = self._inputs(target)
        return torch.stack([self._one(m) for m in mats])

    def forward(self, target=None) -> Tensor:
        mats, _ = self._inputs(target)
        return self.factor * sum((self._one(m) for m in mats[1:]), self._one(mats[0]))

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', type(self.fn).__name__)}, {super().extra_repr()}"


_KINDS: dict[str, type[GroupPenalty]] = {
    "orthogonal": Orthogonality,
    "soft_orthogonal": SoftOrthogonality,
    "double_soft_orthogonal": DoubleSoftOrthogonality,
    "mutual_coherence": MutualCoherence,
    "srip": SRIP,
}


@renamed(coef="factor", since="0.2")
def create_penalty(kind: str | Callable[[Tensor], Tensor], groups=None, factor: float = 1.0, **kwargs) -> GroupPenalty:
    """A penalty by name (``orthogonal``, ``soft_orthogonal``, ``double_soft_orthogonal``,
    ``mutual_coherence``, ``srip``) or from a callable (→ :class:`CallablePenalty`)."""
    if callable(kind) and not isinstance(kind, type):
        return CallablePenalty(kind, groups, factor)
    if not isinstance(kind, str) or kind not in _KINDS:
        near = difflib.get_close_matches(str(kind), list(_KINDS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise FineregError(f"unknown penalty {kind!r}{hint} Choose one of {', '.join(_KINDS)}, or pass a callable")
    return _KINDS[kind](groups, factor, **kwargs)
