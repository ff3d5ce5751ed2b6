"""BatchNorm → GroupNorm, weight standardization's usual partner (BiT, Kolesnikov et al. 2020; GN: Wu & He 2018).

GroupNorm normalizes each sample over groups of C/G channels (and all spatial positions):

    y = (x − μ_{n,g}) / √(σ²_{n,g} + eps) · γ_c + β_c

so it does not depend on the batch (small per-device batches, no running statistics). With weight
standardization, GN+WS matches BN at large batch and beats it at small batch (Qiao et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import FineregError, check_bool, check_int, check_number
from .._select import select_modules
from .._utils import unwrap
from ._parametrize import refuse_ddp
from ._report import ConversionReport, finish

__all__ = ["batchnorm_to_groupnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _divisors_near(c: int, target: int, n: int = 4) -> list[int]:
    divs = [d for d in range(1, c + 1) if c % d == 0]
    return sorted(sorted(divs, key=lambda d: (abs(d - target), -d))[:n])


def batchnorm_to_groupnorm(
    model: nn.Module,
    num_groups: int | None = 32,
    *,
    channels_per_group: int | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    eps: float | None = None,
    copy_affine: bool = True,
    strict: bool = False,
) -> ConversionReport:
    """Replace, in place, every BatchNorm{1,2,3}d / SyncBatchNorm of ``model`` by a ``nn.GroupNorm``.

    The GroupNorm keeps the channel count, ``affine`` flag, device and dtype of the BatchNorm it replaces;
    with ``copy_affine`` its γ, β start from the BatchNorm's (running statistics are dropped: GN has none,
    so the outputs differ from the BatchNorm's). Convert before wrapping the model in DistributedDataParallel (a
    DDP-wrapped model is refused).

    Args:
        model: the model (DDP / ``torch.compile`` wrappers accepted); not itself a BatchNorm.
        num_groups: groups G per layer (default 32, GN's default); every converted layer's channels must be
            divisible by it.
        channels_per_group: alternative to ``num_groups``: G = C / channels_per_group per layer.
        include, exclude: glob patterns over module names (see :func:`finereg.reparam.standardize.standardize`).
        eps: GroupNorm eps; default: the BatchNorm's eps.
        copy_affine: start γ, β from the BatchNorm's weight and bias.
        strict: a model with no BatchNorm to convert raises an error (default: a
            :class:`~finereg._checks.FineregWarning`).

    Raises ``ValueError`` naming the layer and the nearest valid group counts when a channel count is not
    divisible. Returns a :class:`ConversionReport`.
    """
    if (num_groups is None) == (channels_per_group is None):
        raise FineregError(
            "give exactly one of num_groups and channels_per_group "
            "(e.g. num_groups=32, or num_groups=None, channels_per_group=16)"
        )
    for label, v in (("num_groups", num_groups), ("channels_per_group", channels_per_group)):
        if v is not None:
            check_int(v, label, low=1)
    if eps is not None:
        check_number(eps, "eps", low=0, low_open=True)
    check_bool(strict, "strict")
    refuse_ddp(model, "batchnorm_to_groupnorm")
    root = unwrap(model)
    if isinstance(root, _BN):
        raise FineregError(
            "model is itself a BatchNorm layer; it cannot be replaced in place. "
            "Build nn.GroupNorm directly or pass the model that contains it"
        )
    chosen = select_modules(model, lambda m: isinstance(m, _BN), include, exclude, kind="BatchNorm layer")

    # check every layer first, so that an error leaves the model unchanged
    plans = []
    for name, bn in chosen:
        c = bn.num_features
        if num_groups is not None:
            g = num_groups
            if c % g:
                raise FineregError(
                    f"{name} ({type(bn).__name__}) has {c} channels, not divisible by num_groups={g}; "
                    f"group counts that divide {c} near {g}: {_divisors_near(c, g)} "
                    "(or pass channels_per_group=..., or exclude this layer)"
                )
        else:
            if c % channels_per_group:
                raise FineregError(
                    f"{name} ({type(bn).__name__}) has {c} channels, not divisible by channels_per_group="
                    f"{channels_per_group}; divisors of {c} near it: {_divisors_near(c, channels_per_group)}"
                )
            g = c // channels_per_group
        plans.append((name, bn, g))

    report = ConversionReport("BatchNorm -> GroupNorm")
    for name, bn, g in plans:
        ref = bn.weight if bn.affine else (bn.running_mean if bn.running_mean is not None else None)
        dd = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        gn = nn.GroupNorm(g, bn.num_features, eps=bn.eps if eps is None else eps, affine=bn.affine, **dd)
        if bn.affine and copy_affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
        gn.train(bn.training)
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child, gn)
        report.changed.append((name, f"{type(bn).__name__}({bn.num_features}) -> GroupNorm({g}, {bn.num_features})"))
    return finish(report, strict, f"no BatchNorm layer to convert (include={include!r}, exclude={exclude!r})")
