"""The regularizers a trainer integration adds, each a small spec built against the model when training starts.

A term names a finereg method and its hyper-parameters; :class:`~finereg.integrations.Regularization` builds it
on the model (hooks, anchors, the frozen pretrained copy) and the trainer integrations
(:mod:`finereg.integrations.transformers`, :mod:`finereg.integrations.lightning`) apply it at the right point of
the trainer's step. Three kinds:

* **loss terms** (``kind = "loss"``): a scalar added to the task loss of each forward pass;

  ============ ============================================================================= ==========
  term         value (finereg's own functions)                                                reduction
  ============ ============================================================================= ==========
  L2SPTerm     α/2 · Σ‖w − w0‖² + β/2 · Σ‖w_new‖²  (:class:`finereg.L2SP`)                     mean
  DeltaTerm    trade_off · Σ_layers ½‖FM_t − FM_s‖²  (:func:`finereg.behavioral_penalty`)       sum
  BSSTerm      trade_off · Σ_{i≤k} σ²_{-i}(F)  (:class:`finereg.BSS`, F the pooled embedding)   mean
  KDTerm       trade_off · KL(softmax(t/T) ‖ softmax(s/T))  (:func:`finereg.kd_loss`, batchmean) mean
  ============ ============================================================================= ==========

  The reduction says how the term scales with the batch. A ``"mean"`` term (a per-sample mean, or a value that
  does not depend on the batch, as L2-SP's) is scaled exactly as the task loss (the mean cross-entropy) under
  gradient accumulation and DDP. A ``"sum"`` term (DELTA sums over the batch) is multiplied by the number of
  accumulation steps and of processes, so that the accumulated, averaged gradient equals the gradient of the
  term on the whole effective batch (accumulation 4 × batch 4 = batch 16). BSS is a statistic of the batch the
  model sees in one forward: under DDP the features of all processes are gathered (the penalty of the global
  batch), under gradient accumulation each micro-batch has its own (the mean over micro-batches is applied);

* **optimizer terms** (``kind = "optimizer"``): :class:`WrapOptimizer` (``finereg.SPD``, ``finereg.FTP``,
  ``finereg.DecoupledL2SP``) and ``L2SPTerm(mode="decoupled")`` wrap the trainer's optimizer; their state
  (anchors θ0, FTP's radii ...) lives in the optimizer's ``state_dict`` and so in the trainer's checkpoints;

* **gradient terms** (``kind = "grad"``): ``L2SPTerm(mode="fused")`` adds ∂Ω/∂w = α(w − w0) (and βw) into
  ``.grad`` once per optimizer step, after the gradients are unscaled and before clipping (Lightning's
  ``on_before_optimizer_step``).

Module names (``layers``, ``layer``, ``include`` ...) are those of the regularized model's ``named_modules()`` /
``named_parameters()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import FineregError, check_choice, check_int, check_number
from .._select import select_names
from ..feature.bss import BSS
from ..feature.capture import FeatureCapture, Selector, _apply_selector, _check_selector
from ..feature.delta import behavioral_penalty
from ..head.kd import kd_loss
from ..optim._base import WrappedOptimizer
from ..optim.decoupled import DecoupledL2SP
from ..train import dist as fdist
from ..weight.l2 import L2SP, _chosen

if TYPE_CHECKING:
    from .regularization import Regularization

__all__ = ["Term", "L2SPTerm", "DeltaTerm", "BSSTerm", "KDTerm", "WrapOptimizer"]


class Term:
    """Base of the terms (see the module docstring). Subclasses set ``kind``, ``reduction`` and ``uses_source``
    and implement what their kind needs."""

    kind: str = "loss"  # "loss", "optimizer" or "grad"
    reduction: str = "mean"  # loss terms: "mean" (scaled as the task loss) or "sum" (a sum over the batch)
    uses_source: bool = False  # runs the frozen pretrained model on each batch

    def __init__(self, name: str):
        if not isinstance(name, str) or not name.isidentifier():
            raise FineregError(f"name must be a word (letters, digits, _) used as the log key, got {name!r}")
        self.name = name

    def setup(self, reg: Regularization) -> None:
        """Build the term on ``reg.model`` (and ``reg.source``)."""

    def value(self, reg: Regularization, outputs: Any) -> Tensor:
        """The loss term of the batch just run (loss terms)."""
        raise NotImplementedError

    def wrap(self, optimizer: torch.optim.Optimizer, reg: Regularization) -> torch.optim.Optimizer:
        """The optimizer wrapped (optimizer terms)."""
        raise NotImplementedError

    def add_grad_(self, reg: Regularization) -> None:
        """Add the term's gradient into ``.grad`` (gradient terms)."""
        raise NotImplementedError

    def log_value(self, reg: Regularization) -> Tensor | None:
        """A value to log for optimizer and gradient terms (no autograd graph), or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Remove hooks."""

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({hp})"

    def _config(self) -> dict[str, Any]:
        return {"name": self.name}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _wrapper_targets(
    optimizer: torch.optim.Optimizer, reg: Regularization, keep: set[str]
) -> tuple[list[Tensor | None] | None, list[Tensor]]:
    """(anchors, exclude) for a wrapper around ``optimizer``: parameters outside the regularized model, or whose
    name is not in ``keep``, are excluded; anchors come from ``reg.user_source`` by name (None: the values when
    wrapped, i.e. when training starts)."""
    names = reg.param_names()
    params = _optimizer_params(optimizer)
    exclude = [p for p in params if names.get(id(p)) not in keep]
    if reg.user_source is None:
        return None, exclude
    table = reg.source_tensors()
    return [table.get(names.get(id(p), "")) for p in params], exclude


class L2SPTerm(Term):
    """L2-SP (Li et al., ICML 2018): α/2·Σ‖w − w0‖² over the pretrained weights, β/2·Σ‖w‖² over new ones.

    Args:
        alpha: α (pull towards the pretrained weights w0).
        beta: β (plain L2 on parameters without a pretrained value, e.g. the new head); default ``alpha``.
        mode: ``"loss"`` (a loss term, :class:`finereg.L2SP`), ``"fused"`` (its gradient added into ``.grad``
            once per step; Lightning only) or ``"decoupled"`` (:class:`finereg.DecoupledL2SP` around the optimizer:
            θ ← θ − η·α·(θ − θ0) before each step; α is then per unit of learning rate, as AdamW's weight decay).
        include / exclude: glob patterns on parameter names (default: all parameters).
        new_params: patterns of parameters that are new although the pretrained model has a tensor of that name.

    w0 is the pretrained model given to the integration (``source=``), else the model's weights when training
    starts; saved in the trainer's checkpoints (loss / fused: the term's state; decoupled: the optimizer's).
    """

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float | None = None,
        *,
        mode: str = "loss",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        new_params: str | Sequence[str] | None = None,
        name: str = "l2sp",
    ):
        super().__init__(name)
        self.alpha = check_number(alpha, "alpha", low=0)
        self.beta = self.alpha if beta is None else check_number(beta, "beta", low=0)
        self.mode = check_choice(mode, "mode", ("loss", "fused", "decoupled"))
        self.kind = {"loss": "loss", "fused": "grad", "decoupled": "optimizer"}[mode]
        self.include, self.exclude, self.new_params = include, exclude, new_params
        self.penalty: L2SP | None = None
        self.wrapper: DecoupledL2SP | None = None

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "mode": self.mode, "name": self.name}

    def setup(self, reg: Regularization) -> None:
        if self.mode == "decoupled":
            names = list(reg.param_names().values())
            self._keep = set(_chosen(names, self.include, self.exclude))
            self._new = set(select_names(names, self.new_params, "new_params", "parameter"))
            return
        self.penalty = L2SP(
            reg.model,
            anchor=reg.anchor_source(),
            alpha=self.alpha,
            beta=self.beta,
            include=self.include,
            exclude=self.exclude,
            new_params=self.new_params,
        )

    def value(self, reg: Regularization, outputs: Any) -> Tensor:
        return self.penalty()

    def add_grad_(self, reg: Regularization) -> None:
        self.penalty.add_grad_()

    def wrap(self, optimizer: torch.optim.Optimizer, reg: Regularization) -> torch.optim.Optimizer:
        anchors, exclude = _wrapper_targets(optimizer, reg, self._keep)
        names = reg.param_names()
        new = [p for p in _optimizer_params(optimizer) if names.get(id(p)) in self._new]
        self.wrapper = DecoupledL2SP(
            optimizer, anchors, alpha=self.alpha, beta=self.beta, exclude=exclude, new_params=new or None
        )
        return self.wrapper

    @torch.no_grad()
    def log_value(self, reg: Regularization) -> Tensor | None:
        if self.penalty is not None:
            return self.penalty.value()
        if self.wrapper is None:
            return None
        return _decoupled_value(self.wrapper)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.penalty.state_dict()} if self.penalty is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.penalty is not None:
            if "anchors" not in state:
                raise FineregError(f"term {self.name!r}: the saved state has no L2-SP anchors (saved in another mode?)")
            self.penalty.load_state_dict(state["anchors"])


def _decoupled_value(wrapper: DecoupledL2SP) -> Tensor | None:
    """α/2·Σ‖θ − θ0‖² + β/2·Σ‖θ‖² over the wrapper's parameters (each group's α and β), the penalty the decoupled
    decay is the gradient step of."""
    params, anchors, coefs = [], [], []
    for g in wrapper.param_groups:
        for p in g["params"]:
            if id(p) in wrapper._excluded:
                continue
            a = wrapper._anchor_of(p)
            params.append(p)
            anchors.append(a if isinstance(a, Tensor) else torch.zeros_like(p))
            coefs.append(g["l2sp_alpha"] if isinstance(a, Tensor) else g["l2sp_beta"])
    if not params:
        return None
    norms = torch.stack(
        [n.to(params[0].device, torch.float32) for n in torch._foreach_norm(torch._foreach_sub(params, anchors))]
    )
    return 0.5 * (norms.square() * torch.tensor(coefs, device=norms.device)).sum()


class _Captured(Term):
    """Terms that read module outputs of the model (and of the source) captured by hooks."""

    def __init__(self, layers: str | Sequence[str], select: Selector, name: str):
        super().__init__(name)
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers or not all(isinstance(n, str) for n in self.layers):
            raise FineregError(f"layers must be module names like 'encoder.layer.5', got {layers!r}")
        self.select = _check_selector(select, "select")
        self.target: FeatureCapture | None = None
        self.source: FeatureCapture | None = None

    def setup(self, reg: Regularization) -> None:
        self.target = FeatureCapture(reg.model, self.layers, select=self.select)
        if self.uses_source:
            self.source = FeatureCapture(reg.source, self.layers, select=self.select, detach=True)

    def _features(self, cap: FeatureCapture) -> dict[str, Tensor]:
        feats = {n: cap[n] for n in self.layers}  # KeyError naming a module that did not run
        bad = [n for n, t in feats.items() if not isinstance(t, Tensor)]
        if bad:
            raise FineregError(
                f"term {self.name!r}: the outputs of {bad} are {type(feats[bad[0]]).__name__}, not tensors; "
                "pass select= (an int position, a str key or a callable) to pick the tensor"
            )
        return {n: t.float() for n, t in feats.items()}

    def close(self) -> None:
        for cap in (self.target, self.source):
            if cap is not None:
                cap.close()


class DeltaTerm(_Captured):
    """DELTA's behavioral penalty (Li et al., ICLR 2019) on hidden states: trade_off · Σ_layers ½‖FM_t − FM_s‖²,
    FM_s the frozen pretrained model's output of the same layer on the same batch (a sum over the batch).

    Args:
        layers: module names, e.g. ``["encoder.encoder.layer.2", "encoder.encoder.layer.5"]`` (transformer layers).
        trade_off: the coefficient (tllib's default 0.01).
        select: picks the tensor out of a layer's output (default 0: a Hugging Face layer's hidden states).
    """

    reduction = "sum"
    uses_source = True

    def __init__(
        self, layers: str | Sequence[str], trade_off: float = 0.01, *, select: Selector = 0, name: str = "delta"
    ):
        super().__init__(layers, select, name)
        self.trade_off = check_number(trade_off, "trade_off", low=0)

    def _config(self) -> dict[str, Any]:
        return {"layers": self.layers, "trade_off": self.trade_off, "name": self.name}

    def value(self, reg: Regularization, outputs: Any) -> Tensor:
        return self.trade_off * behavioral_penalty(self._features(self.source), self._features(self.target))


class BSSTerm(_Captured):
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019) on the pooled embedding: trade_off · Σ_{i≤k} σ²_{-i}(F),
    F the (batch, dim) output of ``layer`` (flattened). Under DDP the features of all processes are gathered first.

    Args:
        layer: the module whose output the classifier head reads (e.g. ``"pooler"``).
        trade_off: the coefficient (tllib's default 0.001).
        k: how many of the smallest singular values to shrink.
    """

    def __init__(self, layer: str, trade_off: float = 0.001, *, k: int = 1, select: Selector = 0, name: str = "bss"):
        if not isinstance(layer, str):
            raise FineregError(f"layer must be one module name like 'pooler', got {layer!r}")
        super().__init__(layer, select, name)
        self.trade_off = check_number(trade_off, "trade_off", low=0)
        self.bss = BSS(k=check_int(k, "k", low=1))

    def _config(self) -> dict[str, Any]:
        return {"layer": self.layers[0], "trade_off": self.trade_off, "k": self.bss.k, "name": self.name}

    def value(self, reg: Regularization, outputs: Any) -> Tensor:
        f = self._features(self.target)[self.layers[0]].flatten(1)
        if fdist.is_distributed():
            from torch.distributed.nn.functional import all_gather

            f = torch.cat(all_gather(f))
        return self.trade_off * self.bss(f)


class KDTerm(Term):
    """Knowledge distillation against the frozen pretrained model (Hinton et al., 2015; LwF's term when the model
    keeps its source head): trade_off · KD_T(student, teacher), the teacher being the frozen copy run on the batch.

    Args:
        trade_off: the coefficient.
        temperature: T (> 0).
        output: picks the logits from the model's output (a key / attribute such as ``"logits"``, a position, or a
            callable); the same selector reads the teacher's output.
        t2_scaling: multiply by T² (Hinton et al.); default False (tllib's value).
    """

    uses_source = True

    def __init__(
        self,
        trade_off: float = 1.0,
        temperature: float = 1.0,
        *,
        output: int | str | Callable[[Any], Any] = "logits",
        t2_scaling: bool = False,
        name: str = "kd",
    ):
        super().__init__(name)
        self.trade_off = check_number(trade_off, "trade_off", low=0)
        self.temperature = check_number(temperature, "temperature", low=0, low_open=True)
        self.output = _check_selector(output, "output")
        self.t2_scaling = bool(t2_scaling)

    def _config(self) -> dict[str, Any]:
        return {"trade_off": self.trade_off, "temperature": self.temperature, "name": self.name}

    def value(self, reg: Regularization, outputs: Any) -> Tensor:
        student = _apply_selector(self.output, outputs, "model")
        teacher = _apply_selector(self.output, reg.source_outputs, "source model")
        return self.trade_off * kd_loss(
            student.float(), teacher.detach().float(), self.temperature, "batchmean", self.t2_scaling
        )


def _check_wrapper_kwargs(wrapper: type[WrappedOptimizer], kwargs: dict[str, Any]) -> None:
    """The wrapper's required arguments are given and every other one is its own, checked now rather than when
    the trainer builds its optimizer."""
    params = inspect.signature(wrapper).parameters
    own = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"model", "exclude"}
    required = sorted(n for n in own if params[n].default is inspect.Parameter.empty and n not in kwargs)
    unknown = sorted(set(kwargs) - own)
    if required:
        raise FineregError(
            f"WrapOptimizer({wrapper.__name__}) needs {', '.join(f'{n}=...' for n in required)}: "
            f"{wrapper.__name__} has no default for it, e.g. WrapOptimizer(finereg.{wrapper.__name__}, "
            f"{required[0]}=0.5)"
        )
    if unknown:
        raise FineregError(
            f"WrapOptimizer({wrapper.__name__}) got argument(s) {unknown} that {wrapper.__name__} does not take; "
            f"it takes {sorted(own | {'exclude'})}"
        )


class WrapOptimizer(Term):
    """Wrap the trainer's optimizer in a finereg optimizer wrapper: ``WrapOptimizer(finereg.SPD, weight_decay=0.5)``,
    ``WrapOptimizer(finereg.FTP, exclude=["head.*"])``, ``WrapOptimizer(finereg.DecoupledL2SP, alpha=0.1)``.

    θ0 is the pretrained model given to the integration (``source=``), matched by name, else the weights when
    training starts. Parameters outside the regularized model, and those matched by ``exclude`` (glob patterns),
    are left to the inner optimizer. The wrapper's state is in the optimizer's ``state_dict``.
    """

    kind = "optimizer"

    def __init__(self, wrapper: type[WrappedOptimizer], *, exclude: str | Sequence[str] | None = None, **kwargs: Any):
        if not (isinstance(wrapper, type) and issubclass(wrapper, WrappedOptimizer)):
            raise FineregError(
                f"wrapper must be a finereg optimizer wrapper class (finereg.SPD, finereg.FTP, "
                f"finereg.DecoupledL2SP), got {wrapper!r}"
            )
        taken = sorted({"anchors", "model", "optimizer"} & set(kwargs))
        if taken:
            raise FineregError(f"WrapOptimizer sets {taken} itself (θ0 comes from the integration's source=)")
        super().__init__(kwargs.pop("name", wrapper.__name__.lower()))
        _check_wrapper_kwargs(wrapper, kwargs)
        self.wrapper_cls, self.exclude, self.kwargs = wrapper, exclude, kwargs
        self.wrapper: WrappedOptimizer | None = None

    def _config(self) -> dict[str, Any]:
        return {"wrapper": self.wrapper_cls.__name__, **self.kwargs, "name": self.name}

    def setup(self, reg: Regularization) -> None:
        names = list(reg.param_names().values())
        self._keep = set(_chosen(names, None, self.exclude))

    def wrap(self, optimizer: torch.optim.Optimizer, reg: Regularization) -> torch.optim.Optimizer:
        anchors, exclude = _wrapper_targets(optimizer, reg, self._keep)
        self.wrapper = self.wrapper_cls(optimizer, anchors, exclude=exclude, **self.kwargs)
        return self.wrapper
