"""The configuration of a run: :class:`FitConfig`, its checks, its defaults and how a resumed run merges it.

``None`` fields mean "the default for this data and method", filled by :func:`resolve` from the preset of the
data's protocol (:data:`PRESETS`): the quick smoke task (``digits``: the built-in network, 6 epochs of 10 steps,
batch 32, lr 0.05), the real-backbone protocol (``mnist5k``: ImageNet-pretrained EfficientNet-Lite0 at 32 px,
its stem and first three blocks frozen and cached, settings chosen on the validation split, see
``docs/protocol.md``), or a user's ImageFolder (tllib's script settings: 20 epochs of one pass, batch 48,
lr 0.01; on CPU no loader processes and the channels-last format, 2.2x faster per epoch on 2 cores). The
learning rate drops by ``lr_gamma`` at 60 % of the epochs; the weight decay is tllib's for the
method (0 for L2-SP / DELTA, whose penalties replace it; 5e-4 otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .._checks import FineregError, check_bool, check_int, check_number
from .datasets import builtin_name

__all__ = [
    "FitConfig",
    "PRESETS",
    "PROTOCOLS",
    "RESUME_FREE",
    "PATH_FIELDS",
    "check_config",
    "resolve",
    "merge_resume",
    "preset_of",
]

PRESETS: dict[str, dict[str, Any]] = {
    # the quick smoke task (docs/engine.md): a short budget of 60 steps, the same for every sampling rate as
    # tllib's fixed --iters-per-epoch; in it the pretrained start beats a random one by 5-10 points
    "digits": {"arch": "builtin", "epochs": 6, "iters_per_epoch": 10, "batch_size": 32, "lr": 0.05},
    # the real-backbone protocol (docs/protocol.md: each setting chosen on the validation split)
    "mnist5k": {
        "arch": "efficientnet_lite0",
        "image_size": 32,
        "frozen_prefix": "blocks.2",
        "channels_last": True,
        "epochs": 4,
        "iters_per_epoch": 25,
        "batch_size": 32,
        "lr": 0.1,
        "eval_every": 0,
    },
    # the natural-image protocol (docs/protocol.md: each setting chosen on the validation split)
    "cifar10": {
        "arch": "efficientnet_lite0",
        "image_size": 96,
        "frozen_prefix": "blocks.5",
        "channels_last": True,
        "epochs": 4,
        "iters_per_epoch": 25,
        "batch_size": 32,
        "lr": 0.1,
        "eval_every": 0,
    },
    # a user's ImageFolder: tllib's example scripts (20 epochs of one pass, lr 0.01, batch 48); the default network
    # is one whose ImageNet weights a package ships, so it runs offline
    "folder": {
        "arch": "efficientnet_lite0",
        "image_size": 224,
        "epochs": 20,
        "iters_per_epoch": None,
        "batch_size": 48,
        "lr": 0.01,
        # on CPU (measured on 2 cores, efficientnet_lite0 at 224 px): decoding in the training process and the
        # channels-last format made an epoch 2.2x faster than 2 loader processes and the default format
        "on_cpu": {"workers": 0, "channels_last": True},
    },  # fmt: skip
}
# --protocol NAME: the data each protocol trains on (a user's ImageFolder: --data PATH)
PROTOCOLS = {"smoke": "digits", "cifar10": "cifar10", "mnist": "mnist5k", "real": "mnist5k"}  # real: mnist's old name


@dataclass
class FitConfig:
    """Everything a run depends on. ``None`` means "the default for this data / method" (see :func:`resolve`)."""

    data: str = "digits"
    arch: str | None = None
    weights: str | None = None
    method: str = "erm"
    set: dict[str, Any] = field(default_factory=dict)  # {"bss.trade_off": 0.001}
    sample_rate: float = 100
    data_seed: int = 0
    seed: int = 0
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None  # the global batch (split across processes)
    lr: float | None = None  # of the new head; the backbone takes backbone_lr_mult x lr
    backbone_lr_mult: float = 0.1
    lr_steps: list[int] | None = None
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    image_size: int | None = None
    frozen_prefix: str | None = None  # "blocks.K": freeze and cache the stem and blocks 0..K ("none": train all)
    channels_last: bool | None = None
    eval_every: int | None = None  # evaluate every N epochs and after the last (0: after the last only)
    workers: int | None = None  # data loading processes; None: the preset's (0 for an ImageFolder on CPU, else 2)
    threads: int | None = None  # CPU threads; default 1 on the built-in task (its tiny model runs fastest so)
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    deterministic: bool = True
    out: str | None = None
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = True
    cache_dir: str | None = None


# Fields that may change when a run resumes; all others must equal the checkpoint's.
RESUME_FREE = {
    "epochs",
    "eval_every",
    "device",
    "workers",
    "threads",
    "progress",
    "tensorboard",
    "compile",
    "cache_dir",
    "out",
    "resume",
    "overwrite",
}
# Paths finereg writes into: always the current command's (or the environment's default), never a run directory's
# stored config, so a run directory from someone else cannot choose a folder finereg creates and writes into.
PATH_FIELDS = {"cache_dir"}

# The range of every numeric option: (check, keyword arguments); ``None`` values are left to resolve().
_RANGES: dict[str, tuple[Any, dict[str, Any]]] = {
    "sample_rate": (check_number, {"low": 0, "high": 100, "low_open": True}),
    "data_seed": (check_int, {"low": 0}),
    "seed": (check_int, {"low": 0}),
    "epochs": (check_int, {"low": 1}),
    "iters_per_epoch": (check_int, {"low": 1}),
    "batch_size": (check_int, {"low": 1}),
    "lr": (check_number, {"low": 0, "low_open": True}),
    "backbone_lr_mult": (check_number, {"low": 0}),
    "lr_gamma": (check_number, {"low": 0, "high": 1, "low_open": True}),
    "momentum": (check_number, {"low": 0, "high": 1, "high_open": True}),
    "weight_decay": (check_number, {"low": 0}),
    "image_size": (check_int, {"low": 8}),
    "workers": (check_int, {"low": 0}),
    "eval_every": (check_int, {"low": 0}),
    "threads": (check_int, {"low": 1}),
}
_FLAGS = ("bf16", "compile", "deterministic", "overwrite", "progress", "tensorboard", "channels_last")


def check_config(cfg: FitConfig) -> None:
    """Check the type and range of every option (the error names the option as the command line spells it)."""
    for name, (check, kw) in _RANGES.items():
        value = getattr(cfg, name)
        if value is not None:
            check(value, f"--{name.replace('_', '-')}", **kw)
    if cfg.lr_steps is not None:
        for s in cfg.lr_steps:
            check_int(s, "each of --lr-steps (an epoch)", low=1)
    for name in _FLAGS:
        if getattr(cfg, name) is not None:
            check_bool(getattr(cfg, name), name)
    if cfg.out is not None and not str(cfg.out).strip():
        raise FineregError("--out is empty; give the run directory (default: runs/fit-<time>)")


def preset_of(data: str) -> dict[str, Any]:
    """The defaults of ``data``'s protocol: a built-in task's own, else those of a user's ImageFolder."""
    return PRESETS[builtin_name(data) or "folder"]


def resolve(cfg: FitConfig, default_weight_decay: float, *, cpu: bool = True) -> FitConfig:
    """``cfg`` with its ``None`` fields set: the data's preset (with its ``on_cpu`` settings where ``cpu``, the
    run's device being a CPU), the schedule at 60 % and the method's weight decay."""
    preset = {
        "image_size": 224,
        "frozen_prefix": "none",
        "channels_last": False,
        "eval_every": 1,
        "workers": 2,
        **preset_of(cfg.data),
    }
    on_cpu = preset.pop("on_cpu", {})
    preset.update(on_cpu if cpu else {})
    filled = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in preset.items()}
    steps = cfg.lr_steps if cfg.lr_steps is not None else [max(1, round(0.6 * filled["epochs"]))]
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay
    return dataclasses.replace(cfg, **filled, lr_steps=list(steps), weight_decay=wd)


def merge_resume(cfg: FitConfig, saved: dict) -> FitConfig:
    """The checkpoint's config, with the fields ``cfg`` changes from the defaults and ``cfg``'s paths
    (:data:`PATH_FIELDS`, whatever the checkpoint says); a conflicting change of a field that shapes training raises
    :class:`FineregError` listing them."""
    default = FitConfig()
    merged, conflicts = dict(saved), []
    for f in dataclasses.fields(FitConfig):
        new = getattr(cfg, f.name)
        if f.name not in saved or f.name in PATH_FIELDS or (f.name in RESUME_FREE and new != getattr(default, f.name)):
            merged[f.name] = new
        elif new != getattr(default, f.name) and _norm(new) != _norm(saved[f.name]):
            conflicts.append(f"{f.name}: checkpoint {saved[f.name]!r}, now {new!r}")
    if conflicts:
        raise FineregError(
            "cannot resume with different training settings ("
            + "; ".join(conflicts)
            + "). Resume without them, or start a new run (another --out, or --overwrite)"
        )
    merged["resume"] = cfg.resume
    return FitConfig(**{f.name: merged[f.name] for f in dataclasses.fields(FitConfig)})


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
