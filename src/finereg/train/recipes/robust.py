"""Recipes of the robust fine-tuning methods (issue 11): SPD, FTP and decoupled L2-SP (optimizer wrappers), TPGM
(radii learned on validation data) and LP-FT (a linear-probe head, then fine-tuning at a lower learning rate).

All of them enter through :meth:`~finereg.train.recipe.Recipe.wrap_optimizer`, called once on the engine's SGD
(momentum 0.9, Nesterov; param groups ``backbone`` and ``head``) before a checkpoint's optimizer state is loaded.

* The wrappers are the library's classes (:mod:`finereg.optim`) around that SGD, with anchors θ0 = the
  parameters' values when wrapped, i.e. the pretrained weights (nothing has trained yet). Their whole state (θ0,
  FTP's radii and moments) is in ``optimizer.state_dict()``, so the checkpoint carries it and resume is exact.
* Which parameters are new follows the network's declared parts: ``net.backbone`` and ``net.source_head`` are
  pretrained; everything else the optimizer trains (the new ``net.head``, Bi-Tuning's projector) is new.
* Weight decay: SPD, FTP and decoupled L2-SP replace the SGD weight decay (their official scripts set it to 0:
  ``AdamSPD``'s only decay is λ; FTP's ``main_finetune.py`` gives ``SGDP`` ``weight_decay=0.0`` where its SGD
  baseline has 5e-4; L2-SP's script has 0, as :class:`~finereg.train.recipes.weight.L2SPRecipe`). TPGM's and
  LP-FT's official scripts keep it (5e-4 here, tllib's).

The engine holds no math of these methods: each recipe only builds the library object (the tests check the
engine's steps against the library's on the same model and batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..._checks import FineregError
from ...lp_ft import LinearProbe, batchnorm_eval_
from ...merge.tpgm import TPGM
from ...optim import FTP, SPD, DecoupledL2SP
from ..data import derive_seed
from ..models import TransferNet
from ..probe import probe_head
from ..recipe import HP, Context, Recipe, register

__all__ = ["SPDRecipe", "FTPRecipe", "DecoupledL2SPRecipe", "TPGMRecipe", "LPFTRecipe", "ValidStream", "new_params"]

OFFICIAL = "the official code"


def new_params(params: list[Tensor], net: TransferNet) -> list[Tensor]:
    """The entries of ``params`` that are not pretrained (not in ``net.backbone`` or ``net.source_head``)."""
    pretrained = {id(p) for m in (net.backbone, net.source_head) if m is not None for p in m.parameters()}
    return [p for p in params if id(p) not in pretrained]


def _trained(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@register
class SPDRecipe(Recipe):
    """Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024; official ``AdamSPD``): after each SGD step θ̃,
    for each pretrained tensor whose gradient points back towards θ0 (⟨g, θ − θ0⟩ > 0),
    ``θ ← θ̃ − λ·r·(θ̃ − θ0)``, r = clamp((‖θ̃ − θ0‖ − ‖θ − θ0‖) / ‖θ̃ − θ0‖, 0, 1) (:class:`finereg.SPD`).

    ``weight_decay`` is λ: the official optimizer defaults to 0 (off) and its README takes λ from the command
    line, so there is no official default; 1.0 is the engine's, the value at which a selected tensor's distance
    to θ0 does not grow that step. SGD weight decay 0 (SPD replaces it). The new head is left to SGD alone
    (``anchor_head=True`` anchors it at its initial values too, as the official README anchors every trainable
    parameter)."""

    name = "spd"
    group = "robust"
    title = "SPD: Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models (Tian, Huang, Kira, NeurIPS 2024)"
    params = {"weight_decay": HP(1.0, low=0), "anchor_head": HP(False, bool)}
    weight_decay = 0.0
    defaults_from = "the official code; λ is the engine's, the official code has none"
    claims = frozenset({"optimizer", "projection"})

    def wrap_optimizer(self, optimizer, ctx):
        exclude = [] if self.hp["anchor_head"] else new_params(_trained(optimizer), ctx.net)
        return SPD(optimizer, weight_decay=self.hp["weight_decay"], exclude=exclude)


@register
class FTPRecipe(Recipe):
    """Fast Trainable Projection (Tian, Huang, Kira, NeurIPS 2023; official ``SGDP``): after each SGD step each
    pretrained tensor is projected to ``θ0 + clamp(γ/‖c_r‖, 0, 1)·c_r`` (c = θ̃ − θ0, per row, MARS norm), its
    radius γ learned by Adam (μ) from the training gradient, positive hyper-gradients scaled by κ
    (:class:`finereg.FTP`). Defaults of the official ``main_finetune.py``: ``k`` (κ) 1, ``mu`` 1e-2, MARS norm,
    the new head excluded, SGD weight decay 0 (momentum 0.9, Nesterov, as the engine's)."""

    name = "ftp"
    group = "robust"
    title = "FTP: Fast Trainable Projection for Robust Fine-Tuning (Tian, Huang, Kira, NeurIPS 2023)"
    params = {"k": HP(1.0, low=0), "mu": HP(1e-2, low=0), "norm": HP("mars", str, choices=("mars", "l2"))}
    weight_decay = 0.0
    defaults_from = OFFICIAL
    claims = frozenset({"optimizer", "projection"})

    def wrap_optimizer(self, optimizer, ctx):
        hp = self.hp
        exclude = new_params(_trained(optimizer), ctx.net)
        return FTP(optimizer, k=hp["k"], mu=hp["mu"], norm=hp["norm"], exclude=exclude)


@register
class DecoupledL2SPRecipe(Recipe):
    """L2-SP in the optimizer step (:class:`finereg.DecoupledL2SP`): before each SGD step, with η the group's
        learning rate, ``θ ← θ − η·α·(θ − θ0)`` on the pretrained tensors and ``θ ← θ − η·β·θ`` on the new ones.

        Defaults α = β = 0.1: tllib's L2-SP strengths (0.01 on the backbone, 0.01 head L2) divided by 1 − momentum
        (0.9): the loss-term penalty's gradient accumulates in SGD's momentum buffer, which multiplies its steady pull
        by 1/(1 − momentum); the decoupled pull does not pass through the buffer. SGD weight decay 0 (as L2-SP's). β is
    the head's decay, so no head-l2 term is added beside it (``--set head-l2.trade_off=...`` still adds one)."""

    name = "l2sp-decoupled"
    group = "robust"
    title = "L2-SP (Li et al., ICML 2018) decoupled from the gradient as in AdamW (Loshchilov & Hutter, ICLR 2019)"
    params = {"alpha": HP(0.1, low=0), "beta": HP(0.1, low=0)}
    weight_decay = 0.0
    defaults_from = "tllib's L2-SP, per unit of learning rate"
    claims = frozenset({"optimizer"})
    decays_head = True  # β on the new head: no head-l2 term on top (with delta, say)
    conflicts = {"l2sp": "both are L2-SP (l2sp as a loss term, l2sp-decoupled in the optimizer step); use one form"}

    def wrap_optimizer(self, optimizer, ctx):
        new = new_params(_trained(optimizer), ctx.net)
        return DecoupledL2SP(optimizer, alpha=self.hp["alpha"], beta=self.hp["beta"], new_params=new)


class ValidStream:
    """Validation batches ``(x, y)`` without augmentation, endless: one seeded permutation of the split after
    another. ``drawn`` counts the batches handed out, so a resumed run continues with the next one."""

    def __init__(self, images, batch_size: int, seed: int, device: torch.device):
        self.images, self.batch_size, self.seed, self.device = images, batch_size, seed, device
        self.per_pass = math.ceil(len(images) / batch_size)
        self.drawn = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            p, j = divmod(self.drawn, self.per_pass)
            perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(derive_seed(self.seed, p)))
            for b in self.images.eval_batches(self.batch_size, self.device, perm[j * self.batch_size :]):
                self.drawn += 1
                if b.y.numel():  # a batch whose images all failed to load is skipped
                    yield b.x, b.y


@register
class TPGMRecipe(Recipe):
    """Trainable Projected Gradient Method (Tian et al., CVPR 2023; :class:`finereg.TPGM`): each pretrained
    tensor gets a radius γ, and after an SGD step the weights are projected to ``θ0 + clamp(γ/‖θ − θ0‖, 0, 1)·(θ −
    θ0)``; γ is learned by Adam (``lr``) on the loss of the projected network on *validation* batches (the data's
    ``valid`` split, never the test split; a run without one is refused).

    Every ``freq`` steps (counted over the run, from its first) γ takes ``iters`` Adam steps and the weights are
    projected; at the other steps they are projected with the current γ (the official ``tpgm_iters(model)`` /
    ``tpgm_iters(model, apply=True)``). ``post_hoc_iters`` > 0 also learns γ for that many batches after the
    run's last step and projects once more (the official ViT experiment: 200 iterations after fine-tuning; the
    end is the end of the run's ``--epochs``). Defaults of the official DomainNet script (``--proj_freq 1``,
    ``--max_iters 1``, ``--proj_lr 1e-2``, ``--norm_mode mars``, the head excluded, SGD weight decay 5e-4).
    Validation batches: the engine's batch size (at most the split), one seeded permutation per pass. The radii,
    their Adam state, θ0 and the position in the validation stream are in the checkpoint."""

    name = "tpgm"
    group = "robust"
    title = "TPGM: Trainable Projected Gradient Method for Robust Fine-tuning (Tian et al., CVPR 2023)"
    params = {
        "freq": HP(1, int, low=0),
        "iters": HP(1, int, low=1),
        "post_hoc_iters": HP(0, int, low=0),
        "lr": HP(1e-2, low=0, low_open=True),
        "norm": HP("mars", str, choices=("mars", "l2")),
    }
    defaults_from = OFFICIAL
    claims = frozenset({"projection"})

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        if not self.hp["freq"] and not self.hp["post_hoc_iters"]:
            raise FineregError(
                "tpgm.freq=0 and tpgm.post_hoc_iters=0 leave TPGM nothing to do: project during training "
                "(tpgm.freq=N, every N steps) or after it (tpgm.post_hoc_iters=N validation batches)"
            )
        self.tpgm: TPGM | None = None
        self.steps = 0
        self._saved: Mapping[str, Any] = {}
        self._hook = None

    def setup(self, ctx: Context) -> None:
        valid = ctx.data.valid
        if valid is None:
            raise FineregError(
                f"tpgm learns its radii on a validation split, and {ctx.data.name!r} has none: add "
                "ROOT/valid/<class>/<image> to the ImageFolder (images kept out of training; the test split val/ "
                "is never used for it), or use a method that needs no validation data (ftp, spd)"
            )
        self.stream = ValidStream(valid, min(ctx.batch_size, len(valid)), derive_seed(ctx.seed, 0x7A6D), ctx.device)
        trainable = [p for p in ctx.net.parameters() if p.requires_grad]
        hp = self.hp
        self.tpgm = TPGM(ctx.net, self.stream, norm=hp["norm"], lr=hp["lr"], exclude=new_params(trainable, ctx.net))
        if self._saved:
            self.tpgm.load_state_dict(self._saved["tpgm"])
            self.steps, self.stream.drawn = int(self._saved["steps"]), int(self._saved["drawn"])
        self.total_steps = ctx.total_steps

    def wrap_optimizer(self, optimizer, ctx):
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        return optimizer

    def _after_step(self) -> None:
        freq, iters, post = self.hp["freq"], self.hp["iters"], self.hp["post_hoc_iters"]
        self.steps += 1
        if freq:
            if (self.steps - 1) % freq == 0:
                self.tpgm.project_(iters)
            else:
                self.tpgm.apply_()
        if post and self.steps == self.total_steps:
            self.tpgm.project_(post)

    def state_dict(self) -> dict[str, Any]:
        if self.tpgm is None:
            return {}
        return {"tpgm": self.tpgm.state_dict(), "steps": self.steps, "drawn": self.stream.drawn}

    def load_state_dict(self, state) -> None:
        self._saved = dict(state)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _batchnorm_eval_in_training(module, args) -> None:
    """Forward pre-hook: BatchNorm layers in eval mode whenever ``module`` trains (returns None: args unchanged)."""
    if module.training:
        batchnorm_eval_(module)


@register
class LPFTRecipe(Recipe):
    """LP-FT (Kumar et al., ICLR 2022): stage 1 fits the new head as a linear probe on the frozen pretrained
    features of the training set (:func:`finereg.fit_linear_probe` via :func:`~finereg.train.probe.probe_head`:
    λ chosen on the ``valid`` split if the data has one, else on a holdout of the training features; never the
    test split) and loads it into ``net.head``; stage 2 fine-tunes everything from it with every learning rate
    multiplied by ``lr_mult``. The probe is kept in the checkpoint.

    ``lr_mult`` 0.1: the official sweeps (AnanyaKumar/transfer_learning ``run_adaptation_experiments.py``) choose
    LP-FT's learning rate on validation from a grid 10× below fine-tuning's when BatchNorm is in eval mode
    (3e-7…1e-4 vs 3e-6…1e-3), from the same grid otherwise; their single-run setting is 3e-5 for LP-FT against
    1e-4 for fine-tuning. ``batchnorm_eval`` keeps BatchNorm layers in eval mode during training (the
    official ``use_net_val_mode`` option; default off, as there). SGD weight decay 5e-4 (tllib's ERM)."""

    name = "lp-ft"
    group = "robust"
    title = "LP-FT: Fine-Tuning can Distort Pretrained Features and Underperform OOD (Kumar et al., ICLR 2022)"
    params = {"lr_mult": HP(0.1, low=0, low_open=True), "batchnorm_eval": HP(False, bool)}
    defaults_from = OFFICIAL

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        self.probe: dict[str, Any] | None = None
        self._hook = None

    def setup(self, ctx: Context) -> None:
        if self.probe is None:
            p = probe_head(ctx.net, ctx.data, ctx.batch_size, ctx.device, seed=ctx.seed, log=ctx.log)
            self.probe = {"weight": p.weight.cpu(), "bias": p.bias.cpu(), "l2": p.l2, "val_accuracy": p.val_accuracy}
        pr = self.probe
        LinearProbe(pr["weight"], pr["bias"], pr["l2"], [], pr["val_accuracy"]).load_into(ctx.net.head)
        if self.hp["batchnorm_eval"]:
            if batchnorm_eval_(ctx.net) == 0:
                ctx.log("lp-ft.batchnorm_eval: the network has no BatchNorm layer; nothing to keep in eval mode")
            self._hook = ctx.net.register_forward_pre_hook(_batchnorm_eval_in_training)

    def wrap_optimizer(self, optimizer, ctx):
        for g in optimizer.param_groups:
            g["lr"] *= self.hp["lr_mult"]
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"probe": dict(self.probe)} if self.probe is not None else {}

    def load_state_dict(self, state) -> None:
        if "probe" in state:
            self.probe = dict(state["probe"])

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
