"""Recipes of the weight penalties: ERM (none), L2, L2-SP and the head L2 that tllib's DELTA script adds."""

from __future__ import annotations

from ...weight.l2 import L2, L2SP
from ..recipe import HP, Context, Recipe, register

__all__ = ["ERM", "L2Recipe", "L2SPRecipe", "HeadL2"]


@register
class ERM(Recipe):
    """Plain fine-tuning: cross-entropy only (tllib's ``erm.py``)."""

    name = "erm"
    title = "empirical risk minimization (vanilla fine-tuning)"


class HeadL2(Recipe):
    """L2 on the new head, ``trade_off · ½‖w_head‖²``: tllib's DELTA script adds it (trade-off 0.01) to L2-SP and
    DELTA; the engine adds it once to any combination holding one of l2 / l2sp / delta / delta-attention.
    Changed with ``--set head-l2.trade_off=...`` (0 turns it off). Not a method of its own."""

    name = "head-l2"
    title = "L2 penalty on the new classifier head (tllib's head regularization)"
    params = {"trade_off": HP(0.01, low=0)}

    def setup(self, ctx: Context) -> None:
        self.reg = L2(ctx.net, include=["head.*"]) if self.hp["trade_off"] else None

    def terms(self, batch, out, ctx):
        return {"l2_head": self.hp["trade_off"] * self.reg()} if self.reg is not None else {}


@register
class L2Recipe(Recipe):
    """Plain L2 on the backbone, ``trade_off · ½‖w‖²`` (+ head L2): tllib's DELTA script with w0 = 0."""

    name = "l2"
    title = "L2 penalty (weight decay as an explicit loss term); L2-SP paper's baseline"
    params = {"trade_off": HP(0.01, low=0)}
    weight_decay = 0.0
    head_l2 = 0.01

    def setup(self, ctx: Context) -> None:
        self.reg = L2(ctx.net, include=["backbone.*"])

    def terms(self, batch, out, ctx):
        return {"l2": self.hp["trade_off"] * self.reg()}


@register
class L2SPRecipe(Recipe):
    """L2-SP (Li et al., ICML 2018): ``trade_off · ½‖w − w0‖²`` on the backbone towards the pretrained weights
    (+ head L2); tllib's ``delta.py --regularization-type l2_sp``."""

    name = "l2sp"
    title = "L2-SP: Explicit inductive bias for transfer learning with CNNs (Li, Grandvalet, Davoine, ICML 2018)"
    params = {"trade_off": HP(0.01, low=0)}
    weight_decay = 0.0
    needs_source = True
    head_l2 = 0.01

    def setup(self, ctx: Context) -> None:
        self.reg = L2SP(ctx.net, anchor=ctx.source, include=["backbone.*"], unanchored="error")

    def terms(self, batch, out, ctx):
        return {"l2sp": self.hp["trade_off"] * self.reg()}
