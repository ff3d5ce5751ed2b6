"""Weight standardization (WS) of any model, as a ``torch.nn.utils.parametrize`` parametrization.

Each output unit's weights are standardized over its fan-in (the weights that feed it) on every forward:

    "ws"      Ŵ = (W − μ) / (σ_unbiased + eps)                eps = 1e-5   (Qiao et al. 2019, the paper's code)
    "bit"     Ŵ = (W − μ) / √(σ²_biased + eps)                 eps = 1e-6   (BiT; timm ``StdConv2d``)
    "scaled"  Ŵ = gain · γ/√fan_in · (W − μ) / √(σ²_biased + eps)  eps = 1e-6   (NF-Nets; timm ``ScaledStdConv2d``)

μ, σ are the mean and standard deviation of one output unit's fan-in. Which entries form the fan-in:

    Conv{1,2,3}d       weight (out, in/groups, k...)   unit o: W[o]                    fan_in = in/groups · ∏k
    ConvTranspose{1,2,3}d  weight (in, out/groups, k...)   unit o = g·out/groups + j:
                                                        W[g·in_g:(g+1)·in_g, j]      fan_in = in/groups · ∏k
    Linear             weight (out, in)                 unit o: W[o]                    fan_in = in

The raw parameter stays the trained quantity (``module.parametrizations.weight.original``, the same
``nn.Parameter`` object as before, so an optimizer built earlier keeps working); ``module.weight`` is Ŵ and
autograd differentiates through the standardization. The "scaled" variant's learnable gain (one per output
unit, initialised to ``gain_init``) lives in the parametrization module, so ``model.parameters()`` yields it
(build the optimizer after ``standardize``).

Eval-mode cache: with ``module.eval()`` and no gradient needed (``torch.no_grad()``/``inference_mode()``, or
parameters that do not require grad), Ŵ is computed once and reused, so inference costs what a plain
convolution costs. The cache is keyed on the parameter's storage and its in-place version counter
(``Tensor._version``), so ``load_state_dict``, optimizer steps, in-place edits, ``.data =`` swaps and
``.to()`` all invalidate it; ``train()`` drops it. In eval mode *with* gradients (e.g. fine-tuning with frozen
BatchNorm statistics) Ŵ is recomputed every call, so gradients stay exact. Under ``torch.compile`` the cache
is bypassed (the compiled graph recomputes Ŵ; ``bake`` before compiling for inference).

Mixed precision: Ŵ is computed in float32 when the parameter is float16/bfloat16 and cast back, and none of
the ops used is down-cast by autocast, so under ``torch.autocast`` the statistics are float32 while the
convolution itself runs in the low precision.

``bake(model)`` removes the parametrizations and leaves plain layers holding Ŵ (same outputs), for export.
Why not rewriting ``weight.data`` in ``forward``, and the measured speed: docs/weight_standardization.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import FineregError, check_bool, check_choice, check_number, check_type
from .._select import select_modules
from .._utils import unwrap
from ._parametrize import index_of, refuse_ddp, register, remove
from ._report import ConversionReport, finish

__all__ = ["WeightStandardization", "ConversionReport", "standardize", "bake", "VARIANTS"]

#: variant -> default eps (timm 1.0 defaults for "bit" and "scaled"; the WS paper's code for "ws").
VARIANTS: dict[str, float] = {"ws": 1e-5, "bit": 1e-6, "scaled": 1e-6}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# layers that already standardize their weight inside forward (timm)
_ALREADY_STANDARDIZED = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def _standardize_ops(v: Tensor, dims: tuple[int, ...], gamma: Tensor | None, eps: float, unbiased: bool) -> Tensor:
    """Ŵ by plain differentiable ops; ``gamma`` already shaped to broadcast against the per-unit statistics."""
    n = 1
    for d in dims:
        n *= v.shape[d]
    c = v - v.mean(dim=dims, keepdim=True)
    ss = (c * c).sum(dim=dims, keepdim=True)
    if unbiased:  # clamp: a constant unit gets the finite gradient s·(g − mean(g)), as in the fused backward
        return c / (torch.sqrt(ss.clamp_min(torch.finfo(ss.dtype).tiny) / (n - 1)) + eps)
    out = c * torch.rsqrt(ss / n + eps)
    return out if gamma is None else out * gamma


class _FusedStandardize(torch.autograd.Function):
    """Ŵ of a (N, C, L) view, statistics of each C over (N, L), n = N·L values, with BatchNorm's fused backward.

    Forward (plain passes; ``torch.std_mean`` and ``F.batch_norm`` are slower on CPU for one sample):
    μ = mean, c = v − μ, then

        unbiased ("ws"):   Ŵ = c·s,  s = 1/(σ_u + eps),  σ_u = ‖c‖/√(n−1)
        biased ("bit"):    Ŵ = c·ι,  ι = 1/√(‖c‖²/n + eps)

    Backward: BatchNorm's training-mode backward ``dx = w·ι·(g − mean(g) − x̂·mean(g·x̂))`` with x̂ = c·ι is the
    exact gradient of both: for "bit" with w = 1 (Ŵ is BatchNorm's x̂); for "ws", where
    ∂L/∂v = s·(g − mean(g)) − Ŵ·Σ(g·Ŵ)/((n−1)·σ_u), with the per-unit ι = √(s·n/((n−1)·σ_u)) and w = s/ι. So
    one call of the fused ``aten.native_batch_norm_backward`` kernel computes it. Under ``create_graph=True``
    the backward differentiates the plain ops instead (:func:`_standardize_ops`), so higher-order gradients
    are exact too.
    """

    @staticmethod
    def forward(v: Tensor, eps: float, unbiased: bool):
        n = v.shape[0] * v.shape[2]
        mean = v.mean(dim=(0, 2))
        c = v - mean.view(1, -1, 1)
        norm = torch.linalg.vector_norm(c, dim=(0, 2))
        if not unbiased:
            iota = torch.rsqrt(norm.square_().div_(n).add_(eps))
            return c.mul_(iota.view(1, -1, 1)), mean, iota, torch.ones_like(iota)
        std = norm / math.sqrt(n - 1)
        scale = 1.0 / (std + eps)
        # A constant unit (σ_u = 0) has c = 0, so any finite ι gives its exact gradient s·(g − mean(g));
        # clamping σ_u at √tiny keeps ι finite (below it the ι-term is ~σ_u·s·g: nil).
        iota = torch.sqrt(scale * (n / (n - 1)) / std.clamp_min(torch.finfo(v.dtype).tiny ** 0.5))
        return c.mul_(scale.view(1, -1, 1)), mean, iota, scale / iota

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, ctx.eps, ctx.unbiased = inputs
        _out, mean, iota, bn_weight = output
        ctx.mark_non_differentiable(mean, iota, bn_weight)
        ctx.save_for_backward(v, mean, iota, bn_weight)

    @staticmethod
    def backward(ctx, g, *_unused):
        v, mean, iota, bn_weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            with torch.enable_grad():
                leaf = v if v.requires_grad else v.detach().requires_grad_()
                out = _standardize_ops(leaf, (0, 2), None, ctx.eps, ctx.unbiased)
                return torch.autograd.grad(out, leaf, g, create_graph=True)[0], None, None
        dx, _, _ = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(), v, bn_weight, None, None, mean, iota, True, 0.0, [True, False, False]
        )
        return dx, None, None


def _units_and_fan_in(shape: Sequence[int], transposed: bool, groups: int) -> tuple[int, int]:
    """(output units, fan-in) of a weight of ``shape`` (see the module docstring's table)."""
    kernel = math.prod(shape[2:])
    if transposed:
        return groups * shape[1], shape[0] // groups * kernel
    return shape[0], math.prod(shape[1:])


def _module_fan_in(module: nn.Module) -> int:
    transposed = bool(getattr(module, "transposed", False))
    return _units_and_fan_in(tuple(module.weight.shape), transposed, getattr(module, "groups", 1))[1]


class WeightStandardization(nn.Module):
    """Parametrization ``W ↦ Ŵ``: each output unit's weights standardized over its fan-in (see module doc).

    Args:
        weight_shape: shape of the weight it will be registered on.
        variant: ``"ws"`` (unbiased std, eps added after the square root), ``"bit"`` (biased variance, eps
            inside the square root) or ``"scaled"`` (as "bit", times gain·γ/√fan_in).
        eps: stability constant; default ``VARIANTS[variant]`` (1e-5, 1e-6, 1e-6).
        transposed: the weight is a ConvTranspose weight (in, out/groups, k...).
        groups: the layer's ``groups`` (only used for ``transposed``).
        gamma: "scaled" only: fixed scale γ (NF-Nets' activation gain, e.g. 1.7139 for ReLU; default 1).
        gain_init: "scaled" only: initial value of the learnable per-output-unit gain (default 1).
        cache_eval: reuse Ŵ in eval mode when no gradient is needed (see module doc).
        fused: compute Ŵ with an autograd function whose backward is BatchNorm's fused backward kernel
            (higher-order gradients fall back to plain ops and stay exact). ``fused=False``: plain
            differentiable ops throughout (forward-mode AD).
            Grouped ConvTranspose always uses plain ops.

    Use :meth:`for_module` to build one for a layer, or :func:`standardize` for a whole model.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        variant: str = "ws",
        *,
        eps: float | None = None,
        transposed: bool = False,
        groups: int = 1,
        gamma: float = 1.0,
        gain_init: float = 1.0,
        cache_eval: bool = True,
        fused: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise FineregError(
                f"unknown weight standardization variant {variant!r}; choose one of {list(VARIANTS)} "
                "('ws': paper, unbiased std + eps; 'bit': timm StdConv2d; 'scaled': timm ScaledStdConv2d)"
            )
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) < 2:
            raise FineregError(
                f"weight standardization needs a weight with ≥ 2 dims (conv / linear), got shape {shape}"
            )
        if not isinstance(groups, int) or groups < 1 or (transposed and shape[0] % groups):
            raise FineregError(
                f"groups={groups!r} does not fit a ConvTranspose weight of shape {shape} "
                "(in_channels must be divisible by groups)"
            )
        eps = VARIANTS[variant] if eps is None else eps
        check_number(eps, "eps (it keeps a constant unit finite)", low=0, low_open=True)
        self.variant, self.eps, self.transposed = variant, float(eps), bool(transposed)
        self.groups = groups if transposed else 1
        self.weight_shape = shape
        self.out_units, self.fan_in = _units_and_fan_in(shape, transposed, groups)
        if self.fan_in < 2:
            raise FineregError(
                f"a weight of shape {shape} has a fan-in of {self.fan_in}: standardizing one weight per "
                "output unit gives 0 (or NaN for 'ws'); exclude this layer"
            )
        self.gamma = float(gamma)
        self.scale = self.gamma / math.sqrt(self.fan_in)  # γ/√fan_in, as timm's ScaledStdConv2d
        if variant == "scaled":
            self.gain = nn.Parameter(torch.full((self.out_units,), float(gain_init), device=device, dtype=dtype))
        else:
            self.register_parameter("gain", None)
        self.cache_eval, self.fused = cache_eval, fused
        self._cache: tuple | None = None

    @classmethod
    def for_module(
        cls, module: nn.Module, variant: str = "ws", name: str = "weight", **kwargs
    ) -> WeightStandardization:
        """A parametrization fitting ``getattr(module, name)`` (layout and groups read from ``module``)."""
        weight = getattr(module, name)
        transposed = bool(getattr(module, "transposed", False)) and name == "weight"
        kwargs.setdefault("device", weight.device)
        if weight.dtype.is_floating_point:
            kwargs.setdefault("dtype", weight.dtype)
        return cls(weight.shape, variant, transposed=transposed, groups=getattr(module, "groups", 1), **kwargs)

    # -- layout ------------------------------------------------------------------------------------------
    # Conv / Linear: (1, out, K), unit = dim 1, statistics over dims (0, 2).
    # ConvTranspose: (in, out_g, k...) viewed as (g, in_g, out_g, K), unit = (dim 0, dim 2), statistics over
    # dims (1, 3). Both are views: no copy, no permutation.
    def _units_view(self, w: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if not self.transposed:
            return w.reshape(1, w.shape[0], -1), (0, 2)
        g = self.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1), (1, 3)

    def standardized(self, w: Tensor) -> Tensor:
        """Ŵ computed now (no cache), in float32 for float16/bfloat16 weights, returned in ``w``'s dtype."""
        x = w.float() if w.dtype in _LOW_PRECISION else w
        gain = self._parameters["gain"]
        if gain is not None:
            gain = gain.to(x.dtype) * self.scale
        if not self.fused or (self.transposed and self.groups > 1):
            out = self._reference(x, gain)
        else:
            # (N, C = units, L): Conv/Linear (1, out, K); ConvTranspose with groups=1 (in, out, K). Views.
            v = x.reshape(x.shape[0], x.shape[1], -1) if self.transposed else x.reshape(1, x.shape[0], -1)
            out = _FusedStandardize.apply(v, self.eps, self.variant == "ws")[0]
            if gain is not None:  # "scaled": the per-unit gain·γ/√fan_in
                out = out * gain.view(1, -1, 1)
        out = out.reshape(w.shape)
        return out if out.dtype == w.dtype else out.to(w.dtype)

    def _reference(self, x: Tensor, gain: Tensor | None) -> Tensor:
        """Ŵ by plain differentiable ops (any layout; forward-mode AD and ``torch.func`` transforms work)."""
        v, dims = self._units_view(x)
        if gain is not None:
            gain = gain.reshape(1, -1, 1) if not self.transposed else gain.reshape(self.groups, 1, -1, 1)
        return _standardize_ops(v, dims, gain, self.eps, self.variant == "ws")

    def forward(self, w: Tensor) -> Tensor:
        if self.training or not self.cache_eval or torch.compiler.is_compiling():
            return self.standardized(w)
        return self._cached(w)

    # -- eval-mode cache --------------------------------------------------------------------------------
    def _cached(self, w: Tensor) -> Tensor:
        gain = self._parameters["gain"]
        if torch.is_grad_enabled() and (w.requires_grad or (gain is not None and gain.requires_grad)):
            return self.standardized(w)  # a gradient is needed: never reuse a graph
        try:  # in-place version counters (inference tensors have none)
            key = (
                (w._version, w.data_ptr())
                if gain is None
                else (w._version, w.data_ptr(), gain._version, gain.data_ptr())
            )
        except RuntimeError:
            return self.standardized(w)
        c = self._cache
        # The cache keeps aliases of its sources: their storages cannot be freed and reused at the same
        # address while it lives, so an equal data_ptr means the same storage (a .to(), .data = ... swap gives
        # a new one), and equal versions mean no in-place change since.
        if (
            c is not None
            and c[0] == key
            and c[2].shape == w.shape
            and (not c[2].is_inference() or torch.is_inference_mode_enabled())
        ):
            return c[2]
        with torch.no_grad():
            out = self.standardized(w)
        self._cache = (key, (w.detach(), None if gain is None else gain.detach()), out)
        return out

    def clear_cache(self) -> None:
        """Drop the eval-mode cache (done automatically by ``train()``)."""
        self._cache = None

    def train(self, mode: bool = True) -> WeightStandardization:
        self._cache = None
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None  # never pickle / deep-copy the cached tensors
        return state

    def extra_repr(self) -> str:
        s = f"variant={self.variant!r}, eps={self.eps:g}, fan_in={self.fan_in}"
        if self.transposed:
            s += f", transposed=True, groups={self.groups}"
        if self.variant == "scaled":
            s += f", gamma={self.gamma:g}"
        return s


def standardize(
    model: nn.Module,
    variant: str = "ws",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    linear: bool = False,
    eps: float | None = None,
    gamma: float = 1.0,
    gain_init: float = 1.0,
    cache_eval: bool = True,
    strict: bool = False,
) -> ConversionReport:
    """Weight-standardize, in place, the convolutions (and optionally Linear layers) of ``model``.

    Registers a :class:`WeightStandardization` parametrization on the ``weight`` of every Conv1d/2d/3d and
    ConvTranspose1d/2d/3d (any groups, depthwise included) whose name matches ``include`` and not
    ``exclude``; with ``linear=True`` also on ``nn.Linear`` layers (WS is defined for convolutions; on a
    classifier head it fixes each logit's weight norm, so it is opt-in).

    Args:
        model: any module (a ``torch.compile`` wrapper is looked through; standardize before wrapping in
            DistributedDataParallel: a DDP-wrapped model is refused).
        variant: ``"ws"``, ``"bit"`` or ``"scaled"`` (see the module docstring for the formulas).
        include, exclude: glob patterns over ``model.named_modules()`` names (``"layer1.*"``,
            ``"*.downsample.0"``); default: every candidate layer. A pattern matching no module is an error.
        linear: also standardize ``nn.Linear`` layers.
        eps, gamma, gain_init, cache_eval: see :class:`WeightStandardization`.
        strict: a model with nothing to standardize raises an error (default: a
            :class:`~finereg._checks.FineregWarning`).

    Layers with a fan-in of 1, already standardized weights and timm's ``StdConv2d`` family are skipped and
    listed in the report. Returns a :class:`ConversionReport` (``print`` it).

    Example::

        report = standardize(torchvision.models.resnet50(), "ws", exclude="conv1")
        print(report)
    """
    check_type(model, "model", nn.Module, "an nn.Module")
    refuse_ddp(model, "standardize")
    check_choice(variant, "variant", VARIANTS)
    check_bool(linear, "linear")
    check_bool(strict, "strict")
    types = _CONV + ((nn.Linear,) if linear else ())
    hint = "" if linear else " (nn.Linear layers are standardized only with linear=True)"
    chosen = select_modules(
        model,
        lambda m: isinstance(m, types),
        include,
        exclude,
        kind="convolution" + (" or Linear layer" if linear else ""),
        hint=hint,
    )
    report = ConversionReport(f"weight standardization ({variant!r})")
    for name, module in chosen:
        kind = type(module).__name__
        if kind in _ALREADY_STANDARDIZED:
            report.skipped.append((name, f"{kind} already standardizes its weight"))
            continue
        if nn.parameter.is_lazy(module.weight):
            raise FineregError(
                f"{name or 'the model'} ({kind}) is a lazy module with an uninitialized weight; run one "
                "forward pass (or materialize it) before standardize()"
            )
        i = index_of(module, "weight", WeightStandardization)
        if i is not None:
            report.skipped.append((name, f"already standardized ({module.parametrizations.weight[i].variant!r})"))
            continue
        if _module_fan_in(module) < 2:
            report.skipped.append((name, f"fan-in {_module_fan_in(module)} < 2"))
            continue
        ws = WeightStandardization.for_module(
            module, variant, eps=eps, gamma=gamma, gain_init=gain_init, cache_eval=cache_eval
        )
        ws.train(module.training)
        register(module, "weight", ws)
        report.changed.append((name, f"{kind} {tuple(module.weight.shape)} fan_in={ws.fan_in}"))
    kinds = "convolution" + (" or Linear layer" if linear else "")
    return finish(report, strict, f"no {kinds} to standardize (include={include!r}, exclude={exclude!r}){hint}")


def bake(model: nn.Module) -> ConversionReport:
    """Remove weight standardization from ``model``, leaving plain layers that hold Ŵ (same outputs).

    Every weight carrying a :class:`WeightStandardization` gets all its parametrizations removed with the
    current effective value kept (``remove_parametrizations(..., leave_parametrized=True)``: the parameter
    object stays, now holding Ŵ; a "scaled" gain is folded in and disappears). Other parametrizations on the
    same weight (e.g. partial freezing) are baked in too — baking is for inference and export. Layers whose
    weight is not standardized are untouched. Returns a :class:`ConversionReport` of the baked layers.
    """
    check_type(model, "model", nn.Module, "an nn.Module")
    report = ConversionReport("bake")
    for name, module in unwrap(model).named_modules():
        if index_of(module, "weight", WeightStandardization) is None:
            continue
        chain = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
        with torch.no_grad():
            remove(module, "weight")
        report.changed.append((name, f"{type(module).__name__}: baked {chain}"))
    return report
