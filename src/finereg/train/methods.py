"""Methods as small recipes the engine runs, and the registry that names them.

A recipe contributes named loss terms to each step (already multiplied by its trade-off) and may need a set-up
pass before training (channel attention, LwF's recorded source targets, Co-Tuning's relationship), a frozen copy
of the pretrained model (L2-SP anchors, DELTA's source features), the source head, extra augmented views, or a
wrapper around the network (Bi-Tuning). Recipes never hold a regularizer's math: they call the library's
modules (``finereg.weight``, ``finereg.feature``, ``finereg.head``).

Methods combine with ``+`` (``l2sp+bss``); hyper-parameters default to tllib's example scripts and are changed
with ``--set method.key=value``.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._utils import unknown_name_error
from .data import Batch, TrainData
from .dist import DistInfo
from .models import NetOutput, TransferNet

__all__ = [
    "Recipe",
    "Context",
    "StepOut",
    "REGISTRY",
    "register",
    "method_names",
    "parse_method",
    "parse_overrides",
    "build_recipes",
    "default_weight_decay",
]


@dataclass
class StepOut:
    """The outputs of one training forward that loss terms read."""

    logits: Tensor
    features: Tensor | None = None
    source_logits: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, out) -> StepOut:
        if isinstance(out, StepOut):
            return out
        if isinstance(out, NetOutput):
            return cls(out.logits, out.features, out.source_logits)
        if isinstance(out, Tensor):
            return cls(out)
        raise TypeError(f"a training forward must return logits or a NetOutput, got {type(out).__name__}")


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
    source: nn.Module | None = None  # frozen copy of the pretrained TransferNet, in eval mode
    autocast: Callable[[], Any] | None = None  # context manager factory for forwards (bf16)


class Recipe:
    """Base of a method recipe. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # paper
    defaults: ClassVar[dict[str, Any]] = {}  # tllib's hyper-parameters
    weight_decay: ClassVar[float] = 5e-4  # the SGD weight decay of tllib's script for this method
    needs_source: ClassVar[bool] = False  # a frozen copy of the pretrained model (ctx.source)
    uses_source_head: ClassVar[bool] = False  # the forward returns source-head logits
    trains_source_head: ClassVar[bool] = False  # ... and the source head is trained (backbone learning rate)
    views: ClassVar[int] = 1  # augmented views per sample
    wraps: ClassVar[bool] = False  # replaces the network by a wrapper (then defines forward)
    head_l2: ClassVar[float] = 0.0  # tllib's L2 on the new head (DELTA's script) that comes with the method
    needs_features: ClassVar[bool] = False  # reads the pooled features of the forward
    digits_defaults: ClassVar[dict[str, Any]] = {}  # where the built-in digits task departs from tllib (documented)

    def __init__(self, **hparams: Any):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise unknown_name_error(
                f"hyper-parameter of {self.name!r}",
                unknown[0],
                list(self.defaults),
                hint=f"(valid: {', '.join(self.defaults) or 'none'})",
            )
        self.hp = {k: _cast(self.name, k, hparams.get(k, v), v) for k, v in self.defaults.items()}

    def __repr__(self) -> str:
        shown = {k: ("default" if v == [] else v) for k, v in self.hp.items()}  # [] = the method's default choice
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # -- life cycle ----------------------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        """Once before training (after ``load_state_dict`` on resume): build modules, record targets."""

    def wrap(self, net: TransferNet, ctx: Context) -> nn.Module:
        """The module to train in place of ``net`` (only recipes with ``wraps = True``)."""
        return net

    def forward(self, model: nn.Module, batch: Batch) -> StepOut:
        """The training forward (only recipes with ``wraps = True``)."""
        return StepOut.of(model(batch.x))

    def terms(self, batch: Batch, out: StepOut, ctx: Context) -> dict[str, Tensor]:
        """This method's loss terms for the step, each multiplied by its trade-off."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Set-up products to checkpoint (so resuming does not recompute them)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Remove hooks."""


def _cast(method: str, key: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, (list, tuple)):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return type(default)(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{method}.{key} must be a {type(default).__name__} like {default!r}, got {value!r}") from None


REGISTRY: dict[str, type[Recipe]] = {}
_ALIASES = {
    "baseline": "erm",
    "l2-sp": "l2sp",
    "delta:feature-map": "delta",
    "delta:attention": "delta-attention",
    "delta:l2sp": "l2sp",
    "cotuning": "co-tuning",
    "bituning": "bi-tuning",
}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator adding a recipe to :data:`REGISTRY` under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(REGISTRY)


def method_aliases() -> dict[str, str]:
    """Other accepted spellings (tllib's script options and common variants) → registry name."""
    return dict(_ALIASES)


def _normalize(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    return _ALIASES.get(n, n)


def parse_method(spec: str) -> list[str]:
    """``'l2sp+bss'`` → ``['l2sp', 'bss']`` (registry names; aliases such as ``delta:attention`` accepted)."""
    if not spec or not spec.strip():
        raise ValueError(f"empty method; choose from {', '.join(method_names())} (combine with +)")
    names = [_normalize(p) for p in spec.split("+")]
    if "" in names:
        raise ValueError(f"method {spec!r} has an empty part; join method names with single '+', e.g. l2sp+bss")
    for n in names:
        if n not in REGISTRY:
            raise unknown_name_error(
                "method",
                n,
                method_names(),
                hint=f"(methods: {', '.join(method_names())}; combine with +, e.g. l2sp+bss)",
            )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method {dup[0]!r} appears twice in {spec!r}")
    if "erm" in names and len(names) > 1:
        names.remove("erm")
    return names


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``['bss.trade_off=0.01', 'lwf.T=2']`` (or a mapping) → ``{'bss': {'trade_off': 0.01}, 'lwf': {'T': 2.0}}``."""
    out: dict[str, dict[str, Any]] = {}
    if not items:
        return out
    pairs = items.items() if isinstance(items, Mapping) else [_split_set(s) for s in items]
    for key, value in pairs:
        method, dot, hp = key.partition(".")
        if not dot or not hp:
            raise ValueError(f"--set {key}={value}: write method.key=value, e.g. bss.trade_off=0.001")
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        out.setdefault(_normalize(method), {})[hp] = value
    return out


def _split_set(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise ValueError(f"--set {item!r}: write method.key=value, e.g. bss.trade_off=0.001")
    return key.strip(), value.strip()


def build_recipes(
    spec: str, overrides: Mapping[str, Mapping[str, Any]] | None = None, *, digits: bool = False
) -> list[Recipe]:
    """The recipes of ``spec`` with their overrides (over the recipes' ``digits_defaults`` on the built-in task,
    over tllib's defaults otherwise); checks that the combination can run together."""
    names = parse_method(spec)
    overrides = dict(overrides or {})
    stray = sorted(set(overrides) - set(names) - {"head-l2"})
    if stray:
        raise ValueError(
            f"--set names method {stray[0]!r}, which is not in {spec!r} (methods here: "
            f"{', '.join(names)}{', head-l2' if any(REGISTRY[n].head_l2 for n in names) else ''})"
        )
    recipes = [
        REGISTRY[n](**{**(REGISTRY[n].digits_defaults if digits else {}), **overrides.get(n, {})}) for n in names
    ]
    wrappers = [r.name for r in recipes if r.wraps]
    if len(wrappers) > 1:
        raise ValueError(f"{' and '.join(wrappers)} each replace the network's forward; they cannot be combined")
    if wrappers:
        clash = [r.name for r in recipes if r.needs_features or r.uses_source_head]
        if clash:
            raise ValueError(
                f"{wrappers[0]} replaces the network's forward, which then gives neither pooled features "
                f"nor source-head outputs; it cannot be combined with {', '.join(clash)}"
            )
    head_l2 = max((r.head_l2 for r in recipes), default=0.0)
    if head_l2 or "head-l2" in overrides:
        recipes.append(HeadL2(**{"trade_off": head_l2, **overrides.get("head-l2", {})}))
    return recipes


def default_weight_decay(recipes: list[Recipe]) -> float:
    """tllib's SGD weight decay for the methods: 0 when one of them replaces it by an explicit penalty
    (DELTA's script: L2-SP, DELTA), else 5e-4."""
    return min((r.weight_decay for r in recipes), default=Recipe.weight_decay)


# ----------------------------------------------------------------------------------------------- recipes
@register
class ERM(Recipe):
    """Plain fine-tuning: cross-entropy only (tllib's ``erm.py``)."""

    name = "erm"
    title = "empirical risk minimization (vanilla fine-tuning)"


def _as_list(v: Any) -> list[str]:
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v or [])


class HeadL2(Recipe):
    """L2 on the new head, ``trade_off · ½‖w_head‖²``: tllib's DELTA script adds it (trade-off 0.01) to L2-SP and
    DELTA; the engine adds it once to any combination holding one of l2 / l2sp / delta / delta-attention.
    Changed with ``--set head-l2.trade_off=...`` (0 turns it off)."""

    name = "head-l2"
    title = "L2 penalty on the new classifier head (tllib's head regularization)"
    defaults = {"trade_off": 0.01}

    def setup(self, ctx: Context) -> None:
        from ..weight.l2 import L2

        self.reg = L2(ctx.net, include=["head.*"]) if self.hp["trade_off"] else None

    def terms(self, batch, out, ctx):
        return {"l2_head": self.hp["trade_off"] * self.reg()} if self.reg is not None else {}


@register
class L2Recipe(Recipe):
    """Plain L2 on the backbone, ``trade_off · ½‖w‖²`` (+ head L2): tllib's DELTA script with w0 = 0."""

    name = "l2"
    title = "L2 penalty (weight decay as an explicit loss term); L2-SP paper's baseline"
    defaults = {"trade_off": 0.01}
    weight_decay = 0.0
    head_l2 = 0.01

    def setup(self, ctx: Context) -> None:
        from ..weight.l2 import L2

        self.reg = L2(ctx.net, include=["backbone.*"])

    def terms(self, batch, out, ctx):
        return {"l2": self.hp["trade_off"] * self.reg()}


@register
class L2SPRecipe(Recipe):
    """L2-SP (Li et al., ICML 2018): ``trade_off · ½‖w − w0‖²`` on the backbone towards the pretrained weights
    (+ head L2); tllib's ``delta.py --regularization-type l2_sp``."""

    name = "l2sp"
    title = "L2-SP: Explicit inductive bias for transfer learning with CNNs (Li, Grandvalet, Davoine, ICML 2018)"
    defaults = {"trade_off": 0.01}
    weight_decay = 0.0
    needs_source = True
    head_l2 = 0.01

    def setup(self, ctx: Context) -> None:
        from ..weight.l2 import L2SP

        self.reg = L2SP(ctx.net, anchor=ctx.source, include=["backbone.*"], unanchored="error")

    def terms(self, batch, out, ctx):
        return {"l2sp": self.hp["trade_off"] * self.reg()}


@register
class DeltaRecipe(Recipe):
    """DELTA behavioral regularization (Li et al., ICLR 2019): ``trade_off · Σ_layers ½‖FM_t − FM_s‖²`` between the
    feature maps of the network and of the frozen pretrained one on the same batch (+ head L2); tllib's
    ``delta.py --regularization-type feature_map``. ``layers``: module names or globs (default: the last conv of
    each backbone stage, :func:`~finereg.train.models.default_feature_layers`).

    Under DDP the penalty (a sum over the batch) is multiplied by the number of processes, so that the averaged
    gradients equal one process's gradient on the global batch."""

    name = "delta"
    title = "DELTA: DEep Learning Transfer using Feature Map with Attention (Li et al., ICLR 2019), feature map"
    defaults = {"trade_off": 0.01, "layers": []}
    # tllib's 0.01 diverges on the built-in task: its learning rate (0.05) is 5x tllib's and the penalty sums
    # over the batch, so SGD on the conv weights leaves its stable range (NaN within 10 steps; measured).
    digits_defaults = {"trade_off": 0.001}
    weight_decay = 0.0
    needs_source = True
    head_l2 = 0.01

    def _layers(self, ctx: Context) -> list[str]:
        from .._select import match_names
        from .._utils import unknown_name_error
        from .models import default_feature_layers

        wanted = _as_list(self.hp["layers"])
        if not wanted:
            return default_feature_layers(ctx.net)
        names = [n for n, _ in ctx.net.named_modules() if n]
        found = []
        for w in wanted:
            hits = match_names(names, [w]) or match_names(names, [f"backbone.{w}"])
            if not hits:
                raise unknown_name_error(
                    "layer",
                    w,
                    names,
                    hint="(delta.layers takes module names of the network, "
                    "e.g. backbone.layer4.2.conv3, or glob patterns)",
                )
            found += [h for h in hits if h not in found]
        return found

    def setup(self, ctx: Context) -> None:
        from ..feature.capture import FeatureCapture

        self.layers = self._layers(ctx)
        if not self.layers:
            raise ValueError(
                f"{self.name}: the backbone has no convolution to regularize; give --set {self.name}.layers=NAME,..."
            )
        self.target = FeatureCapture(ctx.net, self.layers)
        self.source = FeatureCapture(ctx.source, self.layers, detach=True)
        self.penalty = self._penalty(ctx)
        ctx.log(f"{self.name}: regularizing the feature maps of {', '.join(self.layers)}")

    def _penalty(self, ctx: Context) -> nn.Module:
        from ..feature.delta import BehavioralPenalty

        return BehavioralPenalty()

    def terms(self, batch, out, ctx):
        with torch.no_grad(), ctx.autocast() if ctx.autocast else contextlib.nullcontext():
            ctx.source(batch.x)
        src = {k: v.float() for k, v in self.source.outputs.items()}
        tgt = {k: v.float() for k, v in self.target.outputs.items()}
        return {"delta": self.hp["trade_off"] * ctx.dist.world_size * self.penalty(src, tgt)}

    def close(self) -> None:
        for cap in (getattr(self, "target", None), getattr(self, "source", None)):
            if cap is not None:
                cap.close()


@register
class DeltaAttentionRecipe(DeltaRecipe):
    """DELTA with channel attention (tllib's default ``attention_feature_map``): each channel's squared difference
    weighted by its attention, ``softmax(z / 5)`` of the standardized loss increase when the channel is removed,
    measured with an attention classifier (pretrained backbone, new head trained ``attention_epochs`` on the
    target data, lr decayed ×0.1 every ``attention_lr_decay_epochs``) on at most ``attention_iterations`` batches
    of ``attention_batch_size``. Computed once on rank 0 (broadcast) and kept in the checkpoint."""

    name = "delta-attention"
    title = "DELTA (Li et al., ICLR 2019) with channel attention (tllib's attention_feature_map)"
    defaults = {
        "trade_off": 0.01,
        "layers": [],
        "attention_batch_size": 32,
        "attention_epochs": 10,
        "attention_lr_decay_epochs": 6,
        "attention_iterations": 10,
        "attention_lr": 0.01,
    }

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        self.attention: dict[str, Tensor] | None = None

    def _penalty(self, ctx: Context) -> nn.Module:
        from ..feature.delta import AttentionBehavioralPenalty

        if self.attention is None:
            self.attention = self._compute(ctx)
        return AttentionBehavioralPenalty({k: self.attention[k].to(ctx.device) for k in self.layers})

    def _compute(self, ctx: Context) -> dict[str, Tensor]:
        import copy

        from .._utils import get_submodule
        from ..feature.attention import channel_attention
        from ..feature.attention_classifier import train_attention_classifier
        from . import dist as fdist
        from .data import derive_seed, epoch_plan

        sizes = [int(get_submodule(ctx.net, n).out_channels) for n in self.layers]
        flat = torch.zeros(sum(sizes), dtype=torch.float64)
        if ctx.dist.is_main:
            hp = self.hp
            train = ctx.data.train
            b = min(hp["attention_batch_size"], len(train))
            steps = len(train) // b
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(ctx.seed, 0xA77E))
                order, seeds = epoch_plan(len(train), b, steps, ctx.seed, -1)
                batches = [(bt.x, bt.y) for bt in train.train_batches(order, seeds, 1, ctx.device)]
                classifier = copy.deepcopy(ctx.source).requires_grad_(False)
                classifier.head.reset_parameters()
                train_attention_classifier(
                    classifier,
                    "head",
                    batches,
                    epochs=hp["attention_epochs"],
                    lr=hp["attention_lr"],
                    lr_decay_epochs=hp["attention_lr_decay_epochs"],
                )
                classifier.eval()
                att = channel_attention(classifier, self.layers, batches, max_batches=hp["attention_iterations"])
            flat = torch.cat([att[n].double().cpu() for n in self.layers])
        fdist.broadcast_tensor(flat)
        ctx.log(f"{self.name}: channel attention of {', '.join(self.layers)} computed")
        return dict(zip(self.layers, flat.float().split(sizes)))

    def state_dict(self) -> dict[str, Any]:
        return {"attention": dict(self.attention)} if self.attention is not None else {}

    def load_state_dict(self, state) -> None:
        if state.get("attention"):
            self.attention = {k: v.float() for k, v in state["attention"].items()}


@register
class BSSRecipe(Recipe):
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): ``trade_off · Σ_{i≤k} σ²_{-i}(F)``, the k smallest
    squared singular values of the batch's pooled features; tllib's ``bss.py``. Under DDP the features of all
    processes are gathered (with gradients), so the penalty is that of the global batch."""

    name = "bss"
    title = "BSS: Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage (Chen et al., NeurIPS 2019)"
    defaults = {"trade_off": 0.001, "k": 1}
    needs_features = True

    def setup(self, ctx: Context) -> None:
        from ..feature.bss import BSS

        self.bss = BSS(k=self.hp["k"])

    def terms(self, batch, out, ctx):
        f = out.features
        if ctx.dist.distributed:
            from torch.distributed.nn.functional import all_gather

            f = torch.cat(all_gather(f))
        return {"bss": self.hp["trade_off"] * self.bss(f)}


def _source_outputs(ctx: Context) -> tuple[Tensor, Tensor]:
    """Logits of the pretrained classifier (backbone → source head) on the training set, deterministic view,
    in sample-index order; computed on rank 0 and broadcast."""
    from . import dist as fdist

    n, c = len(ctx.data.train), ctx.net.source_head.out_features
    logits = torch.zeros(n, c)
    if ctx.dist.is_main:
        model = ctx.net.source_model()
        was = model.training
        model.eval()
        with torch.no_grad():
            for b in ctx.data.train.eval_batches(ctx.batch_size, ctx.device):
                logits[b.index] = model(b.x).float().cpu()
        model.train(was)
    fdist.broadcast_tensor(logits)
    return logits, ctx.data.train.labels


@register
class LwFRecipe(Recipe):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016): ``trade_off · KD_T(y_s, y_o)`` with y_s the source
    head's output and y_o the pretrained model's outputs on the training images, recorded before training
    (deterministic transforms); the source head trains with the backbone; tllib's ``lwf.py``."""

    name = "lwf"
    title = "LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016)"
    defaults = {"trade_off": 4.0, "T": 3.0}
    uses_source_head = trains_source_head = True

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        self.targets: Tensor | None = None

    def setup(self, ctx: Context) -> None:
        from ..head.kd import KnowledgeDistillation

        if self.targets is None:
            self.targets = _source_outputs(ctx)[0]
        self.targets = self.targets.to(ctx.device)
        self.kd = KnowledgeDistillation(temperature=self.hp["T"])

    def terms(self, batch, out, ctx):
        return {"kd": self.hp["trade_off"] * self.kd(out.source_logits, self.targets[batch.index.to(ctx.device)])}

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.cpu()} if self.targets is not None else {}

    def load_state_dict(self, state) -> None:
        if "targets" in state:
            self.targets = state["targets"]


@register
class CoTuningRecipe(Recipe):
    """Co-Tuning (You et al., NeurIPS 2020): ``trade_off · CE(y_s, p(y_s | y_t))`` with the category relationship
    learned before training from the pretrained classifier on the training images: ``direct`` (tllib's default,
    mean source probabilities per target class) or ``reverse`` (the paper's calibrated approach). Computed on
    rank 0 and broadcast; kept in the checkpoint. tllib's ``co_tuning.py``."""

    name = "co-tuning"
    title = "Co-Tuning for Transfer Learning (You et al., NeurIPS 2020)"
    defaults = {"trade_off": 2.3, "relationship": "direct"}
    uses_source_head = trains_source_head = True

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        if self.hp["relationship"] not in ("direct", "reverse"):
            raise ValueError(f"co-tuning.relationship must be 'direct' or 'reverse', got {self.hp['relationship']!r}")
        self.relationship: Tensor | None = None

    def setup(self, ctx: Context) -> None:
        from ..head.co_tuning import CoTuning, direct_relationship, reverse_relationship

        if self.relationship is None:
            logits, labels = _source_outputs(ctx)
            n_t = len(ctx.data.classes)
            if self.hp["relationship"] == "direct":
                self.relationship = direct_relationship(torch.softmax(logits, 1), labels, n_t)
            else:
                self.relationship = reverse_relationship(logits, labels, n_t, inputs="logits", seed=ctx.seed)
        self.loss = CoTuning(self.relationship).to(ctx.device)

    def terms(self, batch, out, ctx):
        return {"co_tuning": self.hp["trade_off"] * self.loss(out.source_logits, batch.y)}

    def state_dict(self) -> dict[str, Any]:
        return {"relationship": self.relationship.cpu()} if self.relationship is not None else {}

    def load_state_dict(self, state) -> None:
        if "relationship" in state:
            self.relationship = state["relationship"]


@register
class BiTuningRecipe(Recipe):
    """Bi-Tuning (Zhong et al., 2020): the network becomes a query encoder with a projector, beside a momentum key
    encoder and per-class key queues; loss ``CE + trade_off · (KL(labels_c‖logits_z) + KL(labels_c‖logits_y))``
    on two augmented views; tllib's ``bi_tuning.py``. Under DDP the keys of all processes enter the queues."""

    name = "bi-tuning"
    title = "Bi-tuning of Pre-trained Representations (Zhong et al., arXiv 2020)"
    defaults = {"trade_off": 1.0, "K": 40, "m": 0.999, "T": 0.07, "projection_dim": 128}
    views = 2
    wraps = True

    def wrap(self, net: TransferNet, ctx: Context) -> nn.Module:
        from ..head.bi_tuning import BiTuning, BiTuningClassifier

        hp = self.hp
        encoder_q = BiTuningClassifier(
            net.backbone, len(ctx.data.classes), hp["projection_dim"], features_dim=net.head.in_features
        )
        net.head = encoder_q.head  # one head: the network evaluated is the query encoder
        return BiTuning(encoder_q, num_classes=len(ctx.data.classes), K=hp["K"], m=hp["m"], temperature=hp["T"])

    def forward(self, model: nn.Module, batch: Batch) -> StepOut:
        y_q, logits_z, logits_y, labels_c = model(batch.x, batch.views[0], batch.y)
        return StepOut(y_q, extra={"logits_z": logits_z, "logits_y": logits_y, "labels_c": labels_c})

    def terms(self, batch, out, ctx):
        import torch.nn.functional as F

        e = out.extra
        kl = F.kl_div(e["logits_z"].float(), e["labels_c"], reduction="batchmean") + F.kl_div(
            e["logits_y"].float(), e["labels_c"], reduction="batchmean"
        )
        return {"contrastive": self.hp["trade_off"] * kl}
