"""Recipes of the output losses: LwF, Co-Tuning (both read the source head) and Bi-Tuning (a wrapper)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...head._source import source_outputs
from ...head.bi_tuning import BiTuning, BiTuningClassifier
from ...head.co_tuning import CoTuning, direct_relationship, reverse_relationship
from ...head.kd import KnowledgeDistillation
from .. import dist as fdist
from ..data import Batch
from ..models import Outputs, TransferNet
from ..recipe import HP, Context, Recipe, register

__all__ = ["LwFRecipe", "CoTuningRecipe", "BiTuningRecipe"]


def _source_outputs(ctx: Context) -> tuple[Tensor, Tensor]:
    """Logits of the pretrained classifier (backbone → source head) on the training set, deterministic view,
    in sample-index order; computed on rank 0 and broadcast."""
    logits = torch.zeros(len(ctx.data.train), ctx.net.source_head.out_features)
    if ctx.dist.is_main:
        batches = ((b.x, b.y, b.index) for b in ctx.data.train.eval_batches(ctx.batch_size, ctx.device))
        out = source_outputs(ctx.net.source_model(), batches, device=ctx.device)
        logits[out.indices] = out.outputs.float()
    fdist.broadcast_tensor(logits)
    return logits, ctx.data.train.labels


@register
class LwFRecipe(Recipe):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016): ``trade_off · KD_T(y_s, y_o)`` with y_s the source
    head's output and y_o the pretrained model's outputs on the training images, recorded before training
    (deterministic transforms); the source head trains with the backbone; tllib's ``lwf.py``."""

    name = "lwf"
    title = "LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016)"
    params = {
        "trade_off": HP(4.0, low=0),
        "temperature": HP(3.0, low=0, low_open=True),
        # tllib leaves the source head out of the optimizer; LwF's paper trains it ("pretrained": backbone's rate)
        "source_head": HP("excluded", str, choices=("excluded", "pretrained")),
    }

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        self.targets: Tensor | None = None

    def prepare(self, net: TransferNet) -> None:
        net.use_source_head(self.name, self.hp["source_head"])

    def setup(self, ctx: Context) -> None:
        if self.targets is None:
            self.targets = _source_outputs(ctx)[0]
        self.targets = self.targets.to(ctx.device)
        self.kd = KnowledgeDistillation(temperature=self.hp["temperature"])

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
    params = {"trade_off": HP(2.3, low=0), "relationship": HP("direct", str, choices=("direct", "reverse"))}

    def __init__(self, **hp: Any):
        super().__init__(**hp)
        self.relationship: Tensor | None = None

    def prepare(self, net: TransferNet) -> None:
        net.use_source_head(self.name, "pretrained")  # tllib's Co-Tuning trains it at the backbone's rate

    def setup(self, ctx: Context) -> None:
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
    params = {
        "trade_off": HP(1.0, low=0),
        "K": HP(40, int, low=1),
        "m": HP(0.999, low=0, high=1),
        "temperature": HP(0.07, low=0, low_open=True),
        "projection_dim": HP(128, int, low=1),
        # tllib trains the new projector at the backbone's rate; "new": at the head's
        "projector": HP("pretrained", str, choices=("pretrained", "new")),
    }
    views = 2

    def wrap(self, net: TransferNet, ctx: Context) -> nn.Module:
        hp = self.hp
        encoder_q = BiTuningClassifier(
            net.backbone, len(ctx.data.classes), hp["projection_dim"], features_dim=net.head.in_features
        )
        net.head = encoder_q.head  # one head: the network evaluated is the query encoder
        return BiTuning(
            encoder_q, num_classes=len(ctx.data.classes), K=hp["K"], m=hp["m"], temperature=hp["temperature"]
        )

    def parts(self, model: nn.Module) -> dict[str, str]:
        return model.param_parts(projector=self.hp["projector"])

    def forward(self, model: nn.Module, batch: Batch) -> Outputs:
        y_q, logits_z, logits_y, labels_c = model(batch.x, batch.views[0], batch.y)
        return Outputs(y_q, extra={"logits_z": logits_z, "logits_y": logits_y, "labels_c": labels_c})

    def terms(self, batch, out, ctx):
        e = out.extra
        kl = F.kl_div(e["logits_z"], e["labels_c"], reduction="batchmean") + F.kl_div(
            e["logits_y"], e["labels_c"], reduction="batchmean"
        )
        return {"contrastive": self.hp["trade_off"] * kl}
