"""What a trainer integration holds: the terms built on the model, the frozen pretrained copy, the scaling rules.

:class:`Regularization` is framework-free (torch only); :mod:`finereg.integrations.transformers` and
:mod:`finereg.integrations.lightning` call it from the trainers' extension points:

* :meth:`Regularization.attach` (when the trainer gets the model, before any step): copies the model into a frozen
  source model if a term runs it (DELTA, KD), then builds each term (hooks, anchors);
* :meth:`Regularization.loss` (after the model's forward on a batch): runs the source on the same inputs if needed
  and returns the loss terms, scaled for gradient accumulation and DDP (below);
* :meth:`Regularization.wrap_optimizer` (when the trainer has made its optimizer): the optimizer terms;
* :meth:`Regularization.add_grads_` (after unscaling, before clipping and the step): the gradient terms;
* :meth:`Regularization.state_dict` / :meth:`Regularization.load_state_dict`: the terms' state and the source
  copy, for the trainer's checkpoints.

Scaling. Let M be the number of micro-batches accumulated into one optimizer step, W the number of processes and
f the factor the trainer applies to the returned loss before ``backward`` (1/M for a per-batch mean loss, as both
trainers do by default; 1 when the trainer's loss is already normalized over the accumulated batch). A term of
value v on the micro-batch is returned as::

    c = v / (M·f)        reduction "mean" (a per-sample mean, or a batch-independent value such as L2-SP)
    c = v · W / f        reduction "sum"  (a sum over the samples, DELTA)

so that after the trainer's factor, the accumulation and DDP's average of the gradients, a mean term contributes
the mean of its micro-batch values and a sum term the sum over the whole effective batch: exactly what the term
gives on that batch in a plain loop (the tests check accumulation 4 × batch 4 against batch 16, and two processes
against one). The values ``c·f`` summed over a step are what the integrations log, beside the trainer's loss
(which then equals the task loss plus the logged terms).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError, check_int, check_number
from .._utils import unwrap
from ..train import dist as fdist
from ..weight.l2 import _anchor_tensors, canonical_name
from .terms import Term

__all__ = ["Regularization", "call_model"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on a batch's inputs as a trainer does: a mapping as keyword arguments, a tuple or list as
    positional arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _frozen_copy(model: nn.Module, memo: dict[int, Any] | None) -> nn.Module:
    """A deep copy of ``model`` in eval mode, without gradients and without the model's forward hooks."""
    src = copy.deepcopy(model, memo if memo is not None else {})
    for m in src.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return src.eval().requires_grad_(False)


class Regularization:
    """Terms (:mod:`finereg.integrations.terms`) bound to one model; see the module docstring.

    Args:
        terms: the regularizers, e.g. ``[L2SPTerm(0.01), BSSTerm("pooler"), DeltaTerm(["encoder.encoder.layer.5"])]``.
        source: the pretrained model (anchors of L2-SP and the wrappers, matched by name; the model DELTA and KD run).
            Default: a frozen copy of the model when it is attached (its weights before training), made only if a
            term runs it; anchors are then the model's own weights at that moment.
        drop_inputs: keys of a mapping batch that the source model is not given (the labels).
    """

    def __init__(
        self, terms: Iterable[Term], *, source: nn.Module | None = None, drop_inputs: Sequence[str] = ("labels",)
    ):
        terms = list(terms) if not isinstance(terms, Term) else [terms]
        if not terms:
            raise FineregError("terms is empty: give the regularizers to add, e.g. [L2SPTerm(alpha=0.01)]")
        bad = [t for t in terms if not isinstance(t, Term)]
        if bad:
            raise FineregError(
                f"terms must be finereg.integrations terms (L2SPTerm, DeltaTerm, BSSTerm, KDTerm, WrapOptimizer), "
                f"got {bad[0]!r}"
            )
        names = [t.name for t in terms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FineregError(f"two terms are named {dupes}: give each a different name= (it is its log key)")
        if source is not None and not isinstance(source, nn.Module):
            raise FineregError(f"source must be the pretrained nn.Module or None, got {type(source).__name__}")
        self.terms = terms
        self.user_source = source
        self.drop_inputs = tuple(drop_inputs)
        self.model: nn.Module | None = None
        self.source: nn.Module | None = None
        self.source_outputs: Any = None
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------------------------------------ set-up
    def attach(self, model: nn.Module, *, copy_memo: dict[int, Any] | None = None) -> Regularization:
        """Build every term on ``model`` (wrappers such as DDP are looked through). Call once, before training."""
        if self.model is not None:
            raise FineregError("this Regularization is already attached to a model; make a new one per model")
        if not isinstance(model, nn.Module):
            raise FineregError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = unwrap(model)
        self._names = {}
        for n, p in self.model.named_parameters():
            self._names.setdefault(id(p), canonical_name(n))
        if any(t.uses_source for t in self.terms):
            self.source = (
                self.user_source.eval().requires_grad_(False)
                if self.user_source is not None
                else _frozen_copy(self.model, copy_memo)
            )
        try:
            for t in self.terms:
                t.setup(self)
        except BaseException:
            self.close()
            raise
        return self

    def _check_attached(self) -> None:
        if self.model is None:
            raise FineregError("the Regularization is not attached to a model yet: call attach(model) first")

    def param_names(self) -> dict[int, str]:
        """``id(parameter) -> canonical name`` for the regularized model's parameters."""
        self._check_attached()
        return self._names

    def anchor_source(self) -> nn.Module | None:
        """The model whose weights are w0: the pretrained model given as ``source=``, else None (the model's own
        weights when attached)."""
        return self.user_source

    def source_tensors(self) -> dict[str, Tensor]:
        """The pretrained model's parameters by canonical name (for name-matched anchors)."""
        return _anchor_tensors(self.user_source) if self.user_source is not None else {}

    @property
    def loss_terms(self) -> list[Term]:
        return [t for t in self.terms if t.kind == "loss"]

    # ------------------------------------------------------------------------------------------------ steps
    def _source_on(self, device: torch.device, dtype: torch.dtype) -> None:
        p = next(self.source.parameters(), None)
        if p is not None and (p.device != device or (p.is_floating_point() and p.dtype != dtype)):
            self.source.to(device=device, dtype=dtype)

    @torch.no_grad()
    def run_source(self, inputs: Any, context: Callable[[], AbstractContextManager] | None = None) -> Any:
        """Run the frozen source model on ``inputs`` (without the ``drop_inputs`` keys); keeps its output."""
        ref = next(self.model.parameters())
        self._source_on(ref.device, ref.dtype)
        if isinstance(inputs, Mapping):
            inputs = {k: v for k, v in inputs.items() if k not in self.drop_inputs}
        with context() if context is not None else nullcontext():
            self.source_outputs = call_model(self.source, inputs)
        return self.source_outputs

    def loss(
        self,
        inputs: Any,
        outputs: Any,
        *,
        accumulation: int = 1,
        loss_factor: float | None = None,
        world_size: int | None = None,
        source_context: Callable[[], AbstractContextManager] | None = None,
    ) -> tuple[Tensor | None, OrderedDict[str, Tensor]]:
        """The loss terms of the batch whose forward just ran: ``(total, {name: term})``, each term scaled as in the
        module docstring (``total`` is None when no term is a loss term).

        Args:
            inputs: what the model was called with (the source model gets the same).
            outputs: the model's output (KD reads its logits).
            accumulation: M, the micro-batches per optimizer step.
            loss_factor: f, what the trainer multiplies the returned loss by (default 1/M).
            world_size: W, the number of processes (default: torch.distributed's).
            source_context: a context manager factory for the source forward (the trainer's autocast).
        """
        self._check_attached()
        m = check_int(accumulation, "accumulation", low=1)
        f = 1.0 / m if loss_factor is None else check_number(loss_factor, "loss_factor", low=0, low_open=True)
        w = fdist.world_size() if world_size is None else check_int(world_size, "world_size", low=1)
        terms = self.loss_terms
        if any(t.uses_source for t in terms):
            self.run_source(inputs, source_context)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for t in terms:
            scale = w / f if t.reduction == "sum" else 1.0 / (m * f)
            out[t.name] = t.value(self, outputs) * scale
        self.source_outputs = None
        total = None
        for v in out.values():
            total = v if total is None else total + v
        return total, out

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` wrapped by the optimizer terms, in their order (the first term is the innermost)."""
        self._check_attached()
        for t in self.terms:
            if t.kind == "optimizer":
                optimizer = t.wrap(optimizer, self)
        return optimizer

    @property
    def wraps_optimizer(self) -> bool:
        return any(t.kind == "optimizer" for t in self.terms)

    def add_grads_(self) -> None:
        """The gradient terms' ∂Ω/∂w added into ``.grad`` (once per optimizer step, on unscaled gradients)."""
        self._check_attached()
        for t in self.terms:
            if t.kind == "grad":
                t.add_grad_(self)

    def log_values(self) -> dict[str, float]:
        """Values of the optimizer and gradient terms that have one (no graph; for logging)."""
        out = {}
        for t in self.terms:
            if t.kind != "loss":
                v = t.log_value(self)
                if v is not None:
                    out[t.name] = float(v)
        return out

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The terms' state (L2-SP anchors ...) and the frozen source model's weights when a term runs it."""
        self._check_attached()
        return {
            "version": 1,
            "terms": {t.name: t.state_dict() for t in self.terms},
            "source": self.source.state_dict() if self.source is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the same terms, by name)."""
        self._check_attached()
        if not isinstance(state, Mapping) or state.get("version") != 1 or "terms" not in state:
            raise FineregError("state is not a finereg Regularization state_dict (saved by Regularization.state_dict)")
        saved, ours = sorted(state["terms"]), sorted(t.name for t in self.terms)
        if saved != ours:
            raise FineregError(
                f"the saved state has the terms {saved}, this run has {ours}: resume with the same terms"
            )
        if self.source is not None:
            if state.get("source") is None:
                raise FineregError("the saved state has no source model weights, but a term of this run needs them")
            self.source.load_state_dict(state["source"])
        for t in self.terms:
            t.load_state_dict(state["terms"][t.name])

    def close(self) -> None:
        """Remove every hook the terms registered."""
        for t in self.terms:
            t.close()

    def __repr__(self) -> str:
        inner = ",\n  ".join(map(repr, self.terms))
        return f"Regularization(\n  {inner}\n)"
