"""Weight groups: tensors of several layers viewed as matrices (one row per output unit) and joined.

A :class:`WeightGroup` names weight tensors of several modules (module objects, names, or glob patterns
such as ``"layer3.*.conv2"``), views each one as a matrix with **one row per output unit**, and either joins
them into one matrix (``axis=0``: stack the rows, ``axis=1``: put the columns side by side) or keeps them
separate (``axis=None``: a penalty is applied to each matrix and the values are summed). A penalty receives
the matrices; gradients reach every member because the views and the join are ordinary differentiable ops.

Matrix view of a weight ``W`` (``matrix_view``):

* ``Conv1d/2d/3d``  W: (out, in/groups, k...)          → (out, in/groups · ∏k), row o = W[o].flatten()
* ``Linear``        W: (out, in)                        → (out, in)
* ``ConvTranspose`` W: (in, out/groups, k...)           → (out, in/groups · ∏k) where output unit
  o = g · out/groups + j of group g is row ``W[g·in_g:(g+1)·in_g, j].flatten()`` (in_g = in/groups): the
  weights that produce output channel o, ordered like a Conv row (input channel, then kernel position).
* any other tensor with ≥ 2 dims (Embedding, Bilinear, custom): dim 0 is the output unit, (d0, ∏ rest).

Members always read the *current* tensor with ``getattr(module, name)``, so parametrized weights
(:func:`finereg.reparam.freeze.freeze`, weight standardization) are seen as the model uses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._checks import FineregError, FineregTypeError
from .._select import select_names
from .._utils import get_submodule, strip_prefixes, unknown_name_error, unwrap

__all__ = ["WeightGroup", "matrix_view", "matrix_to_weight", "weight_matrix", "GroupMember"]

_GLOB_CHARS = set("*?[")


def _is_transposed(module: nn.Module | None, name: str) -> bool:
    return name == "weight" and isinstance(module, nn.modules.conv._ConvTransposeNd)


def _groups(module: nn.Module | None) -> int:
    return int(getattr(module, "groups", 1) or 1)


def matrix_view(weight: Tensor, module: nn.Module | None = None, name: str = "weight") -> Tensor:
    """``weight`` of ``module`` (its tensor ``name``) as a matrix with one row per output unit.

    ``module`` only decides the layout: for a ConvTranspose weight (in, out/groups, k...) the output units
    sit on dim 1 (see the module docstring); every other tensor has its output units on dim 0. The result
    is a view/reshape of ``weight`` (differentiable; a copy only for ConvTranspose with groups/kernels).
    """
    if not isinstance(weight, Tensor):
        raise FineregTypeError(f"matrix_view expects a tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise FineregError(
            f"cannot view a {weight.dim()}-D tensor of shape {tuple(weight.shape)} as a matrix with one row per "
            "output unit; weight groups take tensors with at least 2 dims (conv/linear weights, not biases or "
            "norm scales)"
        )
    if not _is_transposed(module, name):
        return weight.reshape(weight.shape[0], -1)
    g = _groups(module)
    c_in, out_g = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    # (in, out_g, k...) -> (g, in_g, out_g, k...) -> (g, out_g, in_g, k...) -> (g·out_g, in_g·∏k)
    w = weight.reshape(g, c_in // g, out_g, *kernel).transpose(1, 2)
    return w.reshape(g * out_g, -1)


def matrix_to_weight(matrix: Tensor, like: Tensor, module: nn.Module | None = None, name: str = "weight") -> Tensor:
    """Inverse of :func:`matrix_view`: a matrix (one row per output unit) back in the layout of ``like``."""
    if matrix.dim() != 2 or matrix.numel() != like.numel():
        raise FineregError(f"matrix of shape {tuple(matrix.shape)} does not hold a tensor of shape {tuple(like.shape)}")
    if not _is_transposed(module, name):
        return matrix.reshape(like.shape)
    g = _groups(module)
    c_in, out_g = like.shape[0], like.shape[1]
    kernel = like.shape[2:]
    return matrix.reshape(g, out_g, c_in // g, *kernel).transpose(1, 2).reshape(like.shape)


def weight_matrix(module: nn.Module, name: str = "weight") -> Tensor:
    """The current tensor ``name`` of ``module`` as a matrix with one row per output unit."""
    return matrix_view(_read(module, name, "the module"), module, name)


def _read(module: nn.Module, name: str, label: str) -> Tensor:
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        names = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        raise unknown_name_error("tensor", name, sorted(set(names)), hint=f"on {label} ({type(module).__name__})")
    return value


@dataclass(frozen=True)
class GroupMember:
    """One tensor of a group: ``getattr(module, param)``, labelled ``name`` (its module's name if known)."""

    name: str
    module: nn.Module
    param: str

    def tensor(self) -> Tensor:
        return _read(self.module, self.param, repr(self.name))

    def matrix(self) -> Tensor:
        return matrix_view(self.tensor(), self.module, self.param)


class WeightGroup:
    """Weight tensors of several modules, each viewed as a matrix with one row per output unit.

    Args:
        members: a module, a name or glob pattern (``"layer3.*.conv2"``, matched with ``fnmatch`` against
            ``model.named_modules()``), or a sequence mixing them. Names and patterns need ``model``. A glob
            keeps only modules whose ``param`` is a tensor with ≥ 2 dims (so ``"layer1.*"`` takes the convs
            and skips BatchNorm); a pattern that matches nothing is an error listing close names.
        model: the model that names are looked up in (DDP / DataParallel / ``torch.compile`` wrappers and
            their ``module.`` / ``_orig_mod.`` prefixes are accepted).
        param: the tensor attribute read on each module (default ``"weight"``).
        axis: how the matrices are joined. ``0`` (default): rows stacked, all members need the same number
            of columns (e.g. 10 one-filter convs → one 10 × 1024 matrix). ``1``: columns side by
            side, all members need the same number of rows. ``None``: not joined; a penalty is applied to
            each member's matrix on its own and the values are summed (batched by shape).

    A group is a plain object holding references to the modules (not an ``nn.Module``, so its members'
    parameters are never registered twice); :meth:`matrix` / :meth:`matrices` read the current weights.
    """

    def __init__(
        self,
        members: nn.Module | str | Sequence[nn.Module | str],
        model: nn.Module | None = None,
        *,
        param: str = "weight",
        axis: int | None = 0,
    ):
        if not isinstance(param, str) or not param:
            raise FineregTypeError(f"param must be a non-empty attribute name such as 'weight', got {param!r}")
        if axis not in (0, 1, None) or isinstance(axis, bool):
            raise FineregError(
                f"axis must be 0 (stack rows), 1 (columns side by side) or None (separate), got {axis!r}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise FineregTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.param = param
        self.axis = axis
        self.members: list[GroupMember] = self._resolve(members, unwrap(model) if model is not None else None)
        if not self.members:
            raise FineregError("a weight group needs at least one member")
        if axis is not None:
            self._check_joinable()

    # -- construction -------------------------------------------------------------------------------------
    def _resolve(self, members, model: nn.Module | None) -> list[GroupMember]:
        if isinstance(members, (nn.Module, str)):
            members = [members]
        elif not isinstance(members, Sequence):
            raise FineregTypeError(
                f"members must be a module, a name / glob pattern, or a sequence of them; got {type(members).__name__}"
            )
        names_of = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        out: list[GroupMember] = []
        seen: set[int] = set()
        for i, item in enumerate(members):
            if isinstance(item, nn.Module):
                item = unwrap(item)
                label = names_of.get(id(item), f"<{type(item).__name__} #{i}>")
                found = [(label, item)]
            elif isinstance(item, str):
                if model is None:
                    raise FineregError(
                        f"member {item!r} is a name; pass model=... to look it up (or pass the module object itself)"
                    )
                found = self._lookup(item, model)
            else:
                raise FineregTypeError(
                    f"member {i} must be an nn.Module or a name / glob pattern, got {type(item).__name__}"
                )
            for label, module in found:
                if id(module) in seen:
                    continue  # a module named twice (e.g. by a name and a pattern) counts once
                seen.add(id(module))
                member = GroupMember(label, module, self.param)
                t = member.tensor()
                if t.dim() < 2:
                    raise FineregError(
                        f"{label}.{self.param} has shape {tuple(t.shape)}; weight groups take tensors "
                        "with at least 2 dims (one row per output unit)"
                    )
                out.append(member)
        return out

    def _lookup(self, pattern: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
        pattern = strip_prefixes(pattern)
        if not (_GLOB_CHARS & set(pattern)):
            return [(pattern, get_submodule(model, pattern))]
        named = dict(model.named_modules())
        usable = [
            n
            for n, m in named.items()
            if isinstance(getattr(m, self.param, None), Tensor) and getattr(m, self.param).dim() >= 2
        ]
        hits = select_names(
            usable,
            pattern,
            "member",
            f"module with a ≥2-D {self.param!r}",
            hint="(patterns use fnmatch: '*' also crosses dots, e.g. 'layer3.*.conv2')",
        )
        return [(n, named[n]) for n in hits]

    def _check_joinable(self) -> None:
        shapes = {m.name: tuple(m.matrix().shape) for m in self.members}
        tensors = [m.tensor() for m in self.members]
        if len({(t.dtype, t.device) for t in tensors}) > 1:
            raise FineregError(
                "members of a joined group must share dtype and device; got "
                + ", ".join(f"{m.name}: {t.dtype} on {t.device}" for m, t in zip(self.members, tensors))
            )
        other = 1 - self.axis
        if len({s[other] for s in shapes.values()}) > 1:
            what = "columns" if self.axis == 0 else "rows"
            listing = ", ".join(f"{n}: {s[0]}×{s[1]}" for n, s in shapes.items())
            alt = (
                "axis=1 (columns side by side; needs equal row counts)"
                if self.axis == 0
                else "axis=0 (rows stacked; needs equal column counts)"
            )
            raise FineregError(
                f"cannot join along axis={self.axis}: the members' matrices have different numbers "
                f"of {what} ({listing}). Use {alt}, axis=None (a penalty on each matrix, summed), "
                "or separate groups"
            )

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The members' labels, in order (module names when a model was given)."""
        return [m.name for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[GroupMember]:
        return iter(self.members)

    def __repr__(self) -> str:
        return f"WeightGroup({self.names}, param={self.param!r}, axis={self.axis})"

    def tensors(self) -> list[Tensor]:
        """The members' current tensors, in their own layouts."""
        return [m.tensor() for m in self.members]

    def matrices(self) -> list[Tensor]:
        """The members' current weights, each as a matrix with one row per output unit."""
        return [m.matrix() for m in self.members]

    def matrix(self) -> Tensor:
        """The members' matrices joined along ``axis`` (a single member: its matrix)."""
        if self.axis is None:
            raise FineregError("this group is not joined (axis=None); use .matrices(), or build it with axis=0 or 1")
        mats = self.matrices()
        return mats[0] if len(mats) == 1 else torch.cat(mats, dim=self.axis)

    def penalty_inputs(self) -> list[Tensor]:
        """What a penalty evaluates: ``[matrix()]`` for a joined group, else ``matrices()``."""
        return self.matrices() if self.axis is None else [self.matrix()]

    def row_slices(self) -> list[slice]:
        """For ``axis=0``: the rows of :meth:`matrix` that belong to each member, in order."""
        if self.axis != 0:
            raise FineregError("row_slices() is defined for groups joined along rows (axis=0)")
        out, start = [], 0
        for m in self.matrices():
            out.append(slice(start, start + m.shape[0]))
            start += m.shape[0]
        return out

    @property
    def shape(self) -> tuple[int, int] | list[tuple[int, int]]:
        """The joined matrix's shape, or (``axis=None``) the list of the members' matrix shapes."""
        shapes = [tuple(m.matrix().shape) for m in self.members]
        if self.axis is None:
            return shapes
        rows = [s[0] for s in shapes]
        cols = [s[1] for s in shapes]
        return (sum(rows), cols[0]) if self.axis == 0 else (rows[0], sum(cols))

    @property
    def numel(self) -> int:
        return sum(math.prod(m.tensor().shape) for m in self.members)
