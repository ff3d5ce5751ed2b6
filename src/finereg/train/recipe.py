"""The framework of engine methods: the :class:`Recipe` base, its hyper-parameter specs (:class:`HP`), the
:class:`Context` recipes read, and the registry they join with :func:`register`.

A recipe contributes named loss terms to each step (already multiplied by its trade-off) and may prepare the
network (use its source head), set up before training (channel attention, LwF's recorded targets, Co-Tuning's
relationship), replace the network by a wrapper with its own forward (Bi-Tuning), replace or adjust the optimizer
(SPD, FTP and decoupled L2-SP wrap it; LP-FT lowers its learning rates; TPGM projects after each step), and keep
set-up products in the checkpoint. Recipes never hold a regularizer's math: they call the library's modules. The
recipes themselves live in :mod:`finereg.train.recipes`; adding a method is one recipe class there, which the CLI
help, ``finereg methods``, the docs table and the bench read from :data:`REGISTRY` (through
:mod:`finereg.train.methods`).

Hyper-parameters default to tllib's example scripts (or the official code of the paper, for methods tllib lacks);
``data_defaults`` holds the documented departures for a protocol's data (chosen on its validation split).
A recipe declares the parts of training it takes over (``claims``, from :data:`CLAIMS`; overriding
:meth:`Recipe.wrap` claims ``"forward"``) and the methods it cannot run with (``conflicts``, with the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._checks import FineregError, check_bool, check_choice, check_int, check_number
from .._utils import unknown_name_error
from .data import Batch, TrainData
from .dist import DistInfo
from .models import Outputs, TransferNet

__all__ = ["HP", "Recipe", "Context", "REGISTRY", "ALIASES", "CLAIMS", "GROUPS", "register", "claims_of"]

# The parts of training a recipe may take over; no two recipes of a combination may claim the same one.
CLAIMS = {
    "forward": "replace the network's forward",
    "optimizer": "wrap the optimizer (two wrappers would nest in an order no paper defines)",
    "projection": "project the weights back towards the pretrained ones after each step (one would undo the other)",
}


@dataclass(frozen=True)
class HP:
    """A hyper-parameter: its default, type (``float``, ``int``, ``bool``, ``str``, ``list`` of names) and range
    (``low``/``high``, ``low_open``; ``choices`` for strings). :meth:`parse` turns a ``--set`` value into a
    checked value."""

    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None

    def parse(self, name: str, value: Any) -> Any:
        if self.kind is float:
            return check_number(value, name, low=self.low, high=self.high, low_open=self.low_open)
        if self.kind is int:
            return check_int(value, name, low=self.low, high=self.high)
        if self.kind is bool:
            return check_bool(value, name)
        if self.kind is list:  # module names or globs: "a,b" or a list of strings
            items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
            if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
                raise FineregError(f"{name} must be comma-separated names, got {value!r}")
            return list(items)
        if not isinstance(value, str):
            raise FineregError(f"{name} must be a string, got {value!r}")
        return check_choice(value, name, self.choices) if self.choices else value


@dataclass
class Context:
    """What a recipe's set-up and loss terms may read."""

    net: TransferNet  # the network being fine-tuned (unwrapped)
    data: TrainData
    dist: DistInfo
    device: torch.device
    batch_size: int
    seed: int
    run_dir: Path
    cache_dir: Path
    log: Callable[[str], None] = print
    source: TransferNet | None = None  # frozen copy of the pretrained network, eval mode (recipes with needs_source)
    autocast: Callable[[], Any] | None = None  # context manager factory for forwards (bf16)
    total_steps: int = 0  # optimizer steps of the whole run (epochs x steps per epoch)


class Recipe:
    """Base of a method recipe. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # paper
    params: ClassVar[dict[str, HP]] = {}  # hyper-parameters with tllib's defaults
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # data name -> departures from the defaults there
    group: ClassVar[str] = "tllib"  # the bench's method group (:data:`GROUPS`)
    weight_decay: ClassVar[float] = 5e-4  # the SGD weight decay of tllib's script for this method
    head_l2: ClassVar[float] = 0.0  # tllib's L2 on the new head (DELTA's script) that comes with the method
    decays_head: ClassVar[bool] = False  # decays the new head itself: then no head-l2 is added (unless --set)
    views: ClassVar[int] = 1  # augmented views of each sample per step
    needs_source: ClassVar[bool] = False  # reads ctx.source, a frozen copy of the pretrained network
    needs_features: ClassVar[bool] = False  # reads the pooled features of the network's forward
    defaults_from: ClassVar[str] = "tllib"  # where the defaults come from (``finereg methods`` says it)
    claims: ClassVar[frozenset[str]] = frozenset()  # parts of training taken over (keys of CLAIMS)
    conflicts: ClassVar[dict[str, str]] = {}  # method name -> why this recipe cannot run with it

    def __init__(self, **hparams: Any):
        unknown = sorted(set(hparams) - set(self.params))
        if unknown:
            raise unknown_name_error(
                f"hyper-parameter of {self.name!r}",
                unknown[0],
                list(self.params),
                hint=f"(valid: {', '.join(self.params) or 'none'})",
            )
        self.hp = {k: spec.parse(f"{self.name}.{k}", hparams.get(k, spec.default)) for k, spec in self.params.items()}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {k: spec.default for k, spec in cls.params.items()}

    def __repr__(self) -> str:
        shown = {k: ("default" if v == [] else v) for k, v in self.hp.items()}  # [] = the method's default choice
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # -- hooks, in the order the engine calls them -----------------------------------------------------
    def prepare(self, net: TransferNet) -> None:
        """Before anything is built on the network: e.g. make its forward return the source head's logits."""

    def wrap(self, net: TransferNet, ctx: Context) -> nn.Module | None:
        """A module to train in place of ``net`` (then :meth:`forward` is the training forward), or ``None``."""
        return None

    def parts(self, model: nn.Module) -> dict[str, str] | None:
        """The learning-rate parts (:func:`finereg.lr_policy.param_groups`) of the module :meth:`wrap` returned;
        ``None``: what the trained module declares (``param_parts()``)."""
        return None

    def setup(self, ctx: Context) -> None:
        """Once before training (after ``load_state_dict`` on resume): build modules, record targets."""

    def forward(self, model: nn.Module, batch: Batch) -> Outputs:
        """The training forward of the module :meth:`wrap` returned."""
        return model(batch.x)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, ctx: Context) -> torch.optim.Optimizer:
        """The optimizer to train with in place of ``optimizer``: a wrapper around it (declare ``"optimizer"`` in
        ``claims``), or ``optimizer`` itself, adjusted (learning rates, a step hook). Called once, right after the
        engine's SGD is made (its param groups ``"backbone"``: the pretrained parts, ``"head"``: the new ones)
        and before the scheduler is made and a checkpoint's optimizer state is loaded: whatever state the returned
        optimizer keeps in its ``state_dict()`` is checkpointed and restored. The parameters still hold their
        pretrained values here (and a recipe's set-up products, e.g. LP-FT's head)."""
        return optimizer

    def terms(self, batch: Batch, out: Outputs, ctx: Context) -> dict[str, Tensor]:
        """This method's loss terms for the step, each multiplied by its trade-off."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Set-up products to checkpoint (so resuming does not recompute them)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Remove hooks."""


# The bench's method groups: tllib's methods (the default grid) and the robust fine-tuning methods.
GROUPS = {
    "tllib": "the methods of tllib (the default)",
    "robust": "the robust fine-tuning methods (optimizer, projection, probe)",
}

REGISTRY: dict[str, type[Recipe]] = {}
ALIASES = {
    "baseline": "erm",
    "l2-sp": "l2sp",
    "delta:feature-map": "delta",
    "delta:attention": "delta-attention",
    "delta:l2sp": "l2sp",
    "cotuning": "co-tuning",
    "bituning": "bi-tuning",
}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator adding a recipe to :data:`REGISTRY` under ``cls.name`` (a name taken twice is an error)."""
    if not cls.name or cls.name in REGISTRY or cls.name in ALIASES:
        raise ValueError(f"recipe {cls.__name__}: the method name {cls.name!r} is empty or taken")
    if cls.group not in GROUPS:
        raise ValueError(f"recipe {cls.__name__}: unknown group {cls.group!r} (known: {', '.join(GROUPS)})")
    unknown = sorted(set(cls.claims) - set(CLAIMS))
    if unknown:
        raise ValueError(f"recipe {cls.__name__}: unknown claims {unknown} (known: {', '.join(CLAIMS)})")
    REGISTRY[cls.name] = cls
    return cls


def claims_of(r: Recipe) -> frozenset[str]:
    return r.claims | ({"forward"} if type(r).wrap is not Recipe.wrap else set())
