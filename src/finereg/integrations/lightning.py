"""finereg in PyTorch Lightning, through its conventions (extra ``lightning``).

::

    from finereg.integrations import BSSTerm, DeltaTerm, L2SPTerm
    from finereg.integrations.lightning import FineregCallback, FineregModule

    class Classifier(FineregModule, L.LightningModule):           # the mixin gives self.finereg_loss
        def training_step(self, batch, batch_idx):
            out = self.model(**batch)
            return out.loss + self.finereg_loss(batch, out)         # the loss terms, logged by self.log

    terms = [L2SPTerm(0.01, new_params="head.*"), BSSTerm("pooler"), DeltaTerm(["encoder.encoder.layer.5"])]
    L.Trainer(callbacks=[FineregCallback(terms, module="model")]).fit(Classifier(model), loader)

:class:`FineregCallback` does what lives in Lightning's hooks:

* ``setup`` (stage ``"fit"``, before a checkpoint is restored): builds the terms on ``pl_module.<module>`` (the
  LightningModule itself when ``module`` is None): hooks, anchors, the frozen copy;
* ``on_fit_start`` (after ``configure_optimizers``, before the optimizer state is restored): wraps the optimizer
  in the optimizer terms (``finereg.SPD``, ``finereg.FTP``, ``finereg.DecoupledL2SP``), so their state rides in
  the checkpoint's ``optimizer_states``;
* ``on_before_optimizer_step`` (after AMP's unscale, before clipping): the fused L2-SP gradient
  (``L2SPTerm(mode="fused")``), once per optimizer step;
* ``state_dict`` / ``load_state_dict``: the terms' state (L2-SP anchors, the source copy), saved in the
  checkpoint with the module's state and restored by ``Trainer.fit(..., ckpt_path=...)``.

The loss terms go where the loss is made, in ``training_step``: :meth:`FineregCallback.loss` (or the mixin's
``self.finereg_loss``) runs the frozen source model on the same inputs when a term needs it and returns the sum
of the terms, scaled for Lightning's ``accumulate_grad_batches`` (which divides the returned loss) and its
processes (see :mod:`finereg.integrations.regularization`), each term logged with ``self.log`` as
``finereg/<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError, MissingDependencyError
from .._utils import get_submodule
from .regularization import Regularization
from .terms import Term

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the extra is missing
    raise MissingDependencyError(
        "finereg.integrations.lightning needs Lightning: pip install 'finereg[lightning]'"
    ) from None

__all__ = ["FineregCallback", "FineregModule"]


class FineregCallback(pl.Callback):
    """Adds finereg regularizers to a Lightning run (see the module docstring).

    Args:
        regularizers: the terms (:mod:`finereg.integrations.terms`).
        module: the attribute path of the regularized model inside the LightningModule (e.g. ``"model"``); None:
            the LightningModule itself. Layer and parameter names of the terms are relative to it.
        source: the pretrained model (anchors by name; the model DELTA and KD run). Default: a frozen copy of the
            regularized model when fitting starts, made if a term runs it.
        drop_inputs: keys of a mapping batch the source model is not given.
        log_prefix: prefix of the logged names.
        sync_dist: passed to ``self.log`` (average the logged values over processes at every step).
    """

    def __init__(
        self,
        regularizers: Sequence[Term] | Term,
        *,
        module: str | None = None,
        source: nn.Module | None = None,
        drop_inputs: Sequence[str] = ("labels",),
        log_prefix: str = "finereg/",
        sync_dist: bool = False,
    ):
        self.reg = Regularization(regularizers, source=source, drop_inputs=drop_inputs)
        if module is not None and not isinstance(module, str):
            raise FineregError(f"module must be the attribute path of the model in the LightningModule, got {module!r}")
        self.module, self.log_prefix, self.sync_dist = module, str(log_prefix), bool(sync_dist)
        self._pending: dict[str, Any] | None = None
        self._wrapped: list[torch.optim.Optimizer] = []
        self._logged_step = -1

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reg.model is not None:
            return
        target = pl_module if self.module is None else get_submodule(pl_module, self.module)
        self.reg.attach(target, copy_memo={id(trainer): None})  # a copy of the LightningModule leaves its trainer
        if self._pending is not None:
            self.reg.load_state_dict(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.reg.wraps_optimizer:
            return
        optimizers = list(trainer.strategy.optimizers)
        if len(optimizers) != 1:
            raise FineregError(
                f"optimizer terms wrap one optimizer; configure_optimizers returned {len(optimizers)}: wrap them "
                "yourself with finereg.SPD / FTP / DecoupledL2SP inside configure_optimizers"
            )
        if optimizers[0] in self._wrapped:  # fit called again: the strategy kept our wrapper
            return
        wrapped = self.reg.wrap_optimizer(optimizers[0])
        trainer.strategy.optimizers = [wrapped]
        self._wrapped.append(wrapped)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.reg.add_grads_()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # the optimizer terms' values: once per logged optimizer step
        if step % max(trainer.log_every_n_steps, 1) == 0 and step != self._logged_step:
            self._logged_step = step
            for name, value in self.reg.log_values().items():
                pl_module.log(self.log_prefix + name, value, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, pl_module: pl.LightningModule, inputs: Any, outputs: Any) -> Tensor:
        """The loss terms of the batch the regularized model just ran on (``inputs``: what it was called with,
        ``outputs``: what it returned), summed, scaled for accumulation and processes, each logged.

        Under automatic optimization Lightning divides the returned loss by ``accumulate_grad_batches`` (M): the
        terms are scaled for it. Under manual optimization nothing is divided: the terms are those of one batch
        (M = 1); scale them yourself if you accumulate."""
        if self.reg.model is None:
            raise FineregError(
                "FineregCallback.loss is called before fitting started: pass the callback to the Trainer"
            )
        trainer = pl_module.trainer
        auto = pl_module.automatic_optimization
        m = int(trainer.accumulate_grad_batches) if auto else 1
        total, terms = self.reg.loss(
            inputs, outputs, accumulation=m, loss_factor=1.0 / m, world_size=trainer.world_size
        )
        for name, value in terms.items():
            pl_module.log(
                self.log_prefix + name,
                value.detach(),
                on_step=True,
                on_epoch=True,
                sync_dist=self.sync_dist,
                batch_size=1,
            )
        if total is None:
            return next(self.reg.model.parameters()).new_zeros(())
        return total

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self.reg.state_dict() if self.reg.model is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.reg.model is None:
            self._pending = state_dict  # restored at setup
        else:
            self.reg.load_state_dict(state_dict)

    def close(self) -> None:
        """Remove the terms' hooks (the callback cannot be used afterwards)."""
        self.reg.close()


class FineregModule:
    """Mixin for a LightningModule: ``self.finereg_loss(inputs, outputs)`` is the :class:`FineregCallback`'s loss
    terms (the Trainer must have exactly one FineregCallback)."""

    def finereg_loss(self, inputs: Any, outputs: Any) -> Tensor:
        callbacks = [c for c in self.trainer.callbacks if isinstance(c, FineregCallback)]
        if len(callbacks) != 1:
            raise FineregError(
                f"finereg_loss needs exactly one FineregCallback in the Trainer's callbacks, found {len(callbacks)}"
            )
        return callbacks[0].loss(self, inputs, outputs)
