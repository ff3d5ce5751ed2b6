"""WiSE-FT: weight-space ensembles of the pretrained (zero-shot) and the fine-tuned model.

Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi, Namkoong, Schmidt.
"Robust fine-tuning of zero-shot models", CVPR 2022 (official code: mlfoundations/wise-ft ``src/wise_ft.py``).

For each floating-point entry of the two state dicts::

    θ(α) = (1 − α)·θ0 + α·θ1                                     (plain interpolation)
    θ(α) = (c0·θ0 + c1·θ1) / (c0 + c1),  c0 = (1 − α)·max(F0, f),  c1 = α·max(F1, f)   (Fisher-weighted)

with θ0 the zero-shot / pretrained model (its head: the zero-shot head, or for a model without one the linear
probe's head, :func:`finereg.fit_linear_probe`), θ1 the fine-tuned model, F0 / F1 the diagonal Fisher
informations of the two (:func:`finereg.fisher_diagonal`) and f the floor (official default 1e-8). An entry with
no Fisher in either model is interpolated plainly; with a Fisher in one model only it is an error (as the
official assert).

Both are computed as a lerp, θ0 + w·(θ1 − θ0) with w = α (plain) or w = c1 / (c0 + c1) (Fisher), the same
number up to rounding, with three exact properties the official expression lacks: α = 0 gives θ0 and α = 1 gives
θ1 bit for bit, and an entry equal in both (a frozen weight or row) is left untouched. Integer buffers
(BatchNorm's ``num_batches_tracked``) are θ1's (the official code interpolates them as floats), and so are the
parameters of a θ1 module with ``requires_grad=False``.

BatchNorm: interpolated weights do not match the interpolated running statistics; give ``bn_batches`` (training
batches) to :func:`wise_ft_sweep` to recompute them for each α. α is chosen on a validation split by the
``evaluate`` callback, never on the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import FineregError, check_bool, check_number
from ..weight.l2 import canonical_name
from ._state import (
    StateLike,
    aligned,
    as_state,
    floating_keys,
    frozen_keys,
    lerp_states,
    load_merged,
    restored_on_error,
)

__all__ = ["wise_ft", "wise_ft_sweep", "WiseFTSweep", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def wise_ft(
    theta0: StateLike,
    theta1: StateLike,
    alpha: float,
    *,
    fishers: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    fisher_floor: float = 1e-8,
) -> dict[str, Tensor]:
    """The WiSE-FT weights θ(α) (see the module docstring) as a state dict with θ1's keys.

    Args:
        theta0: the zero-shot / pretrained model (module or state dict).
        theta1: the fine-tuned model (module or state dict).
        alpha: α in [0, 1] (0: θ0, 1: θ1).
        fishers: ``(F0, F1)``, diagonal Fisher informations by parameter name, for the Fisher-weighted merge.
        fisher_floor: f > 0, the floor of the Fisher values (official 1e-8; 0 would divide 0 by 0 where both
            Fishers are 0).
    """
    alpha = check_number(alpha, "alpha", low=0, high=1)
    s1 = as_state(theta1, "theta1")
    s0 = aligned(s1, as_state(theta0, "theta0"), "theta0")
    return _merge(s0, s1, alpha, floating_keys(s1, keep=frozen_keys(theta1)), _fishers(s1, fishers), fisher_floor)


def _fishers(reference: dict[str, Tensor], fishers: tuple | None) -> tuple[dict, dict] | None:
    if fishers is None:
        return None
    if not (isinstance(fishers, (tuple, list)) and len(fishers) == 2):
        raise FineregError("fishers must be a pair (F0, F1) of name → tensor mappings (see fisher_diagonal)")
    return tuple(_fisher_for(reference, f, f"fishers[{i}]") for i, f in enumerate(fishers))


def _merge(
    s0: dict[str, Tensor],
    s1: dict[str, Tensor],
    alpha: float,
    keys: list[str],
    fishers: tuple[dict, dict] | None,
    fisher_floor: float,
) -> dict[str, Tensor]:
    """θ(α) over ``keys`` (aligned state dicts); other entries are θ1's."""
    if fishers is None:
        return lerp_states(s0, s1, alpha, keys)
    floor = check_number(fisher_floor, "fisher_floor", low=0, low_open=True)  # 0 gives 0/0 where both Fishers are 0
    f0, f1 = fishers
    one_sided = sorted((set(f0) ^ set(f1)) & set(keys))
    if one_sided:
        raise FineregError(f"a Fisher is given for one model only: {one_sided[:5]}; give both or neither")
    fk = [k for k in keys if k in f0]
    out = lerp_states(s0, s1, alpha, [k for k in keys if k not in f0])
    if fk:
        c0 = torch._foreach_mul(torch._foreach_clamp_min([f0[k] for k in fk], floor), 1 - alpha)
        c1 = torch._foreach_mul(torch._foreach_clamp_min([f1[k] for k in fk], floor), alpha)
        w = torch._foreach_div(c1, torch._foreach_add(c0, c1))
        out.update(zip(fk, torch._foreach_lerp([s0[k] for k in fk], [s1[k] for k in fk], w)))
    return out


def _fisher_for(reference: dict[str, Tensor], fisher: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """A Fisher mapping re-keyed to ``reference``'s keys (it may cover only some of them)."""
    if not isinstance(fisher, Mapping):
        raise FineregError(f"{what} must map parameter names to tensors, got {type(fisher).__name__}")
    by_name = {canonical_name(k): k for k in reference}
    out = {}
    for k, v in fisher.items():
        key = by_name.get(canonical_name(str(k)))
        if key is None:
            raise FineregError(f"{what} has an entry {k!r} that the models do not have")
        if v.shape != reference[key].shape:
            raise FineregError(f"{what}[{k!r}] has shape {tuple(v.shape)}, the weight {tuple(reference[key].shape)}")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise FineregError(f"{what}[{k!r}] holds negative, NaN or infinite values: a Fisher is finite and >= 0")
        out[key] = v.detach().to(device=reference[key].device, dtype=reference[key].dtype)
    return out


@dataclass
class WiseFTSweep:
    """The result of :func:`wise_ft_sweep`: one row of metrics per α, the α chosen on the ``select`` metric,
    and its weights (already loaded into the model)."""

    alphas: list[float]
    results: list[dict[str, float]]
    best_alpha: float
    best_state: dict[str, Tensor] = field(repr=False)


def wise_ft_sweep(
    model: nn.Module,
    theta0: StateLike,
    theta1: StateLike,
    evaluate: Callable[[nn.Module], float | Mapping[str, float]],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    select: str | None = None,
    maximize: bool = True,
    bn_batches: Iterable | None = None,
    fishers: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    fisher_floor: float = 1e-8,
) -> WiseFTSweep:
    """Evaluate θ(α) for each α and keep the best on the validation metric.

    For each α: ``model`` gets θ(α) (BatchNorm statistics recomputed on ``bn_batches`` if given), then
    ``evaluate(model)`` returns a number (the validation metric) or a mapping of metrics (``select`` names the
    validation one; others, e.g. a shifted test set's accuracy, are only reported). The best α wins, on ties the
    larger α (nearer the fine-tuned end θ1); its weights stay in ``model``.

    Args:
        model: the module the weights load into (θ1's architecture).
        theta0, theta1: the zero-shot / pretrained and the fine-tuned model (modules or state dicts; read once,
            before ``model`` is modified, so ``theta1`` may be ``model`` itself).
        evaluate: the validation callback.
        alphas: the α to try (default 0, 0.1, ..., 1).
        select: the key of the metric to choose on, when ``evaluate`` returns a mapping.
        maximize: the larger metric wins (accuracy); False for a loss.
        bn_batches: batches (``x`` or ``(x, ...)``) to recompute BatchNorm statistics for each α.
        fishers, fisher_floor: the Fisher-weighted merge (see :func:`wise_ft`).
    """
    if not isinstance(model, nn.Module):
        raise FineregError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise FineregError("evaluate must be a callable: evaluate(model) -> validation metric")
    maximize = check_bool(maximize, "maximize")
    alphas = [check_number(a, "alphas[]", low=0, high=1) for a in alphas]
    if not alphas:
        raise FineregError("alphas is empty: give the α values to try, e.g. (0, 0.25, 0.5, 0.75, 1)")
    s1 = {k: v.clone() for k, v in as_state(theta1, "theta1").items()}  # copies: model may be theta1
    s0 = {k: v.clone() for k, v in aligned(s1, as_state(theta0, "theta0"), "theta0").items()}
    keys = floating_keys(s1, keep=frozen_keys(theta1))
    f = _fishers(s1, fishers)
    results: list[dict[str, float]] = []
    best, best_state = None, None
    sign = 1.0 if maximize else -1.0
    with restored_on_error(model):  # evaluate may raise (Ctrl-C included): the model keeps its weights
        for a in alphas:
            load_merged(model, _merge(s0, s1, a, keys, f, fisher_floor), bn_batches)
            with torch.no_grad():
                row = {"alpha": a, **_metrics(evaluate(model), select)}
            results.append(row)
            if best is None or (sign * row["score"], a) > (sign * best["score"], best["alpha"]):  # ties: larger α
                best = row
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
    return WiseFTSweep(alphas, results, best["alpha"], best_state)


def _metrics(value: float | Mapping[str, float], select: str | None) -> dict[str, float]:
    """The callback's result as a row: its metrics plus ``score`` (the one to choose on)."""
    if isinstance(value, Mapping):
        if select is None or select not in value:
            raise FineregError(
                f"evaluate returned metrics {sorted(value)}: pass select=<the validation metric's key> "
                f"(got select={select!r})"
            )
        row = {str(k): float(v) for k, v in value.items()}
        row["score"] = check_number(row[select], f"evaluate(model)[{select!r}]")  # NaN would never compare
        return row
    if isinstance(value, Tensor):
        value = value.item()
    return {"score": check_number(value, "evaluate(model)")}
