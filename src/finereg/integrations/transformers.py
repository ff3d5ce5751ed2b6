"""finereg in Hugging Face's ``Trainer``, through its documented extension points (extra ``hf``).

::

    from finereg.integrations import BSSTerm, DeltaTerm, L2SPTerm
    from finereg.integrations.transformers import FineregTrainer

    terms = [L2SPTerm(0.01, new_params="head.*"), BSSTerm("pooler"), DeltaTerm(["encoder.encoder.layer.5"])]
    trainer = FineregTrainer(model=model, args=args, train_dataset=train, regularizers=terms)
    trainer.train()

:class:`FineregTrainerMixin` (``FineregTrainer`` is it on ``transformers.Trainer``; put it first in the bases of
your own ``Trainer`` subclass, e.g. ``class MyTrainer(FineregTrainerMixin, SFTTrainer)``) overrides:

* ``__init__``: builds the terms on the model (:meth:`Regularization.attach`: hooks, anchors, the frozen copy);
* ``compute_loss``: in training, the task loss of ``super().compute_loss`` plus the loss terms, scaled for the
  Trainer's gradient accumulation (its ``current_gradient_accumulation_steps`` and whether it divides the loss,
  ``loss_is_scaled_for_ga``) and its processes (see :mod:`finereg.integrations.regularization`); the frozen
  source model runs under the Trainer's autocast (``accelerator.autocast``). Evaluation losses are task losses;
* ``create_optimizer``: the Trainer's optimizer (or the one you passed) wrapped by the optimizer terms
  (``finereg.SPD``, ``finereg.FTP``, ``finereg.DecoupledL2SP``), whose state the Trainer saves in
  ``optimizer.pt`` and restores on resume;
* ``log``: each term's mean per optimizer step since the last log (averaged over processes) beside the Trainer's
  ``loss``, and ``task_loss`` (so ``loss = task_loss + Σ terms``), into ``log_history`` and every reporting
  callback (TensorBoard, CSV ...); optimizer terms log their value (decoupled L2-SP: its penalty);
* ``save_model`` (as ``_save_checkpoint`` calls it): the terms' state (L2-SP anchors, the source copy) in
  ``finereg_state.pt`` in the checkpoint folder; ``train(resume_from_checkpoint=...)`` loads it back.

Not supported: ``L2SPTerm(mode="fused")`` (the Trainer has no hook between unscaling and clipping: use
``"decoupled"``, the fused form inside the optimizer step, or ``"loss"``), ``model_init`` (give the model).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._checks import FineregError, MissingDependencyError
from .._utils import atomic_write
from .regularization import Regularization
from .terms import Term

try:
    import transformers
    from transformers.trainer_utils import get_last_checkpoint
except ImportError:  # pragma: no cover - the extra is missing
    raise MissingDependencyError(
        "finereg.integrations.transformers needs Hugging Face transformers and accelerate: pip install 'finereg[hf]'"
    ) from None

__all__ = ["FineregTrainerMixin", "FineregTrainer", "STATE_NAME"]

STATE_NAME = "finereg_state.pt"
_RESERVED = {"loss", "task_loss", "grad_norm", "learning_rate", "epoch", "step"}


class FineregTrainerMixin:
    """Adds finereg regularizers to a ``transformers.Trainer`` (see the module docstring).

    Args (keywords, besides the Trainer's own):
        regularizers: the terms (:mod:`finereg.integrations.terms`).
        finereg_source: the pretrained model (anchors by name; the model DELTA and KD run). Default: a frozen copy
            of ``model`` as given (its weights before training), made if a term runs it.
    """

    def __init__(self, *args: Any, regularizers: list[Term] | Term, finereg_source: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise FineregError("FineregTrainer needs model=...: model_init (a new model per run) is not supported")
        reg = Regularization(regularizers, source=finereg_source, drop_inputs=tuple(self.label_names or ()))
        fused = [t.name for t in reg.terms if t.kind == "grad"]
        if fused:
            raise FineregError(
                f"{fused}: mode='fused' needs a hook after unscaling and before clipping, which the Trainer lacks; "
                "use mode='decoupled' (the fused form inside the optimizer step) or mode='loss'"
            )
        clash = sorted(_RESERVED & {t.name for t in reg.terms})
        if clash:
            raise FineregError(f"term names {clash} are the Trainer's own log keys: give the terms another name=")
        self.finereg = reg.attach(self.model)
        self._finereg_sums: dict[str, torch.Tensor] = {}
        self._finereg_logged_step = 0
        self._finereg_wrapped = False

    # ------------------------------------------------------------------------------------------------ loss
    def _finereg_loss_factor(self, num_items_in_batch: Any) -> tuple[int, float]:
        """(M, f): the micro-batches of this step and what the Trainer's ``training_step`` multiplies the loss by."""
        m = int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # the Trainer's own rule (transformers >= 4.46)
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        return m, 1.0 if scaled else 1.0 / m

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        m, f = self._finereg_loss_factor(num_items_in_batch)
        total, terms = self.finereg.loss(
            inputs,
            outputs,
            accumulation=m,
            loss_factor=f,
            world_size=self.accelerator.num_processes,
            source_context=self.accelerator.autocast,
        )
        self._finereg_record("task_loss", loss, f)
        for name, value in terms.items():
            self._finereg_record(name, value, f)
        if total is not None:
            loss = loss + total.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _finereg_record(self, name: str, value: torch.Tensor, factor: float) -> None:
        v = value.detach().float() * factor
        self._finereg_sums[name] = self._finereg_sums[name] + v if name in self._finereg_sums else v

    # ------------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        super().create_optimizer(*args, **kwargs)
        if self.finereg.wraps_optimizer and not self._finereg_wrapped:
            self.optimizer = self.finereg.wrap_optimizer(self.optimizer)
            self._finereg_wrapped = True
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._finereg_sums:  # a training log: every process is here
            steps = max(self.state.global_step - self._finereg_logged_step, 1)
            keys = list(self._finereg_sums)
            vec = torch.stack([self._finereg_sums[k] for k in keys]) / steps
            if self.accelerator.num_processes > 1:
                vec = self.accelerator.reduce(vec, reduction="mean")
            logs.update(zip(keys, vec.tolist()))
            self._finereg_sums = {}
            self._finereg_logged_step = self.state.global_step
        if "loss" in logs:
            logs.update(self.finereg.log_values())
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, **kwargs: Any) -> None:
        super().save_model(output_dir, _internal_call=_internal_call, **kwargs)
        if _internal_call and self.args.should_save:  # a checkpoint of the training run
            state = self.finereg.state_dict()
            atomic_write(os.path.join(output_dir or self.args.output_dir, STATE_NAME), lambda f: torch.save(state, f))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)):
            self.finereg_load(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def finereg_load(self, checkpoint: str | os.PathLike) -> None:
        """Restore the terms' state saved in the checkpoint folder ``checkpoint`` (``train(resume_from_checkpoint)``
        calls it)."""
        file = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(file):
            raise FineregError(
                f"{checkpoint} has no {STATE_NAME}: it was not saved by a FineregTrainer, so the regularizers' state "
                "(anchors, the source model) cannot be restored; resume from a checkpoint of this run"
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or garbage file
            raise FineregError(
                f"{file} is corrupt or unreadable ({type(e).__name__}: {e}); the regularizers' state (anchors, the "
                "source model) cannot be restored from it: resume from another checkpoint of this run"
            ) from None
        self.finereg.load_state_dict(state)


class FineregTrainer(FineregTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with finereg regularizers: ``FineregTrainer(..., regularizers=[...])``."""
