"""Weights of finished models as state dicts, matched by name: what WiSE-FT and the soups share.

A model is given as an ``nn.Module`` or a state dict (name → tensor). Names are matched after dropping wrapper
prefixes (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) and reading parametrizations through
(:func:`finereg.weight.canonical_name`); results carry the keys of the reference model (the fine-tuned one), so
they load into it with ``load_state_dict``.

Merging is a lerp (``torch._foreach_lerp``: a + w·(b − a)): an entry equal in both models comes out bit for bit
(a frozen weight, a frozen row), and the end points w = 0 and w = 1 are exact. Integer and boolean entries
(``num_batches_tracked``) are taken from the reference model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import FineregError
from .._utils import close_matches, unwrap
from ..weight.l2 import canonical_name

__all__ = [
    "StateLike",
    "as_state",
    "aligned",
    "frozen_keys",
    "floating_keys",
    "lerp_states",
    "has_batchnorm",
    "load_merged",
    "restored_on_error",
]

StateLike = nn.Module | Mapping[str, Tensor]


def as_state(model: StateLike, what: str) -> dict[str, Tensor]:
    """The state dict of ``model`` (a module or a state dict), detached."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in unwrap(model).state_dict().items()}
    if isinstance(model, Mapping):
        bad = [k for k, v in model.items() if not isinstance(v, Tensor)]
        if bad:
            raise FineregError(f"{what} must map names to tensors; {bad[:3]} are not tensors")
        return {str(k): v.detach() for k, v in model.items()}
    raise FineregError(f"{what} must be an nn.Module or a state dict (name → tensor), got {type(model).__name__}")


def frozen_keys(model: StateLike) -> set[str]:
    """State-dict keys of the parameters of ``model`` with ``requires_grad=False`` (none for a state dict)."""
    if not isinstance(model, nn.Module):
        return set()
    return {k for k, p in unwrap(model).named_parameters() if not p.requires_grad}


def aligned(reference: dict[str, Tensor], other: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """``other`` re-keyed to ``reference``'s keys (matched by canonical name), on its devices and dtypes.

    Raises a :class:`FineregError` listing the names either side lacks, or the shapes that differ."""
    by_name = {canonical_name(k): v for k, v in other.items()}
    ref_names = {k: canonical_name(k) for k in reference}
    missing = [k for k, n in ref_names.items() if n not in by_name]
    extra = sorted(set(by_name) - set(ref_names.values()))
    if missing or extra:
        lines = []
        for k in missing[:5]:
            near = close_matches(ref_names[k], by_name, n=2)
            lines.append(f"{what} lacks {k!r}" + (f" (has {', '.join(map(repr, near))})" if near else ""))
        if extra:
            lines.append(f"{what} has extra entries {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise FineregError("the models' state dicts do not match: " + "; ".join(lines) + " (same architecture?)")
    out = {}
    bad = []
    for k, n in ref_names.items():
        v = by_name[n]
        if v.shape != reference[k].shape:
            bad.append(f"{k}: {tuple(v.shape)} vs {tuple(reference[k].shape)}")
        out[k] = v.to(device=reference[k].device, dtype=reference[k].dtype) if v.is_floating_point() else v
    if bad:
        raise FineregError(f"{what} has tensors of other shapes: " + "; ".join(bad[:5]))
    return out


def floating_keys(reference: dict[str, Tensor], keep: Iterable[str] = ()) -> list[str]:
    """Keys whose entries are merged (floating point and not in ``keep``)."""
    keep = set(keep)
    return [k for k, v in reference.items() if v.is_floating_point() and k not in keep]


def lerp_states(
    a: dict[str, Tensor], b: dict[str, Tensor], weight: float | Sequence[Tensor], keys: list[str]
) -> dict[str, Tensor]:
    """``b`` with ``keys`` replaced by lerp(a, b, weight) = a + weight·(b − a) (new tensors); other entries are
    clones of ``b``'s. ``weight`` is a number or one tensor per key (``torch._foreach_lerp``)."""
    merged_keys = set(keys)
    out = {k: v.clone() for k, v in b.items() if k not in merged_keys}
    if keys:
        w = weight if isinstance(weight, (int, float)) else list(weight)
        merged = torch._foreach_lerp([a[k] for k in keys], [b[k] for k in keys], w)
        out.update(zip(keys, merged))
    return {k: out[k] for k in b}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def load_merged(model: nn.Module, state: dict[str, Tensor], bn_batches: Iterable | None) -> None:
    """Load ``state`` into ``model``; if ``bn_batches`` is given and the model has BatchNorm, recompute its
    running statistics on them (``torch.optim.swa_utils.update_bn``: a cumulative average in train mode)."""
    unwrap(model).load_state_dict(state)
    if bn_batches is not None and has_batchnorm(model):
        device = next((p.device for p in model.parameters()), None)
        torch.optim.swa_utils.update_bn(bn_batches, model, device=device)


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block that loads other weights into ``model``; if it raises (``KeyboardInterrupt`` included), the
    weights, buffers and train/eval mode that ``model`` had before are loaded back, so that nothing is lost."""
    inner = unwrap(model)
    saved = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    modes = [m.training for m in inner.modules()]
    try:
        yield
    except BaseException:
        inner.load_state_dict(saved)
        for m, mode in zip(inner.modules(), modes):
            m.training = mode
        raise
