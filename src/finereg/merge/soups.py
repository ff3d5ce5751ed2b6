"""Model soups: averages of the weights of models fine-tuned from the same start.

Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon, Kornblith, Schmidt.
"Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference
time", ICML 2022 (official code: mlfoundations/model-soups).

* uniform soup: θ = 1/K · Σ_k θ_k over all K ingredients;
* greedy soup: sort the ingredients by their validation score, best first; start from the best; add the next
  one to the soup (θ ← n/(n+1)·θ + 1/(n+1)·θ_k, the average of n + 1 ingredients) and keep it only if the soup's
  validation score strictly improves.

Averages are built as running lerps (θ ← lerp(θ, θ_k, 1/(n+1))), the mean up to rounding, so that an entry
equal in all ingredients (a frozen weight) comes out bit for bit. Integer buffers are the first ingredient's
(uniform) or the current soup's (greedy). ``bn_batches`` recomputes BatchNorm statistics of each soup evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import FineregError, check_bool
from ._state import StateLike, aligned, as_state, floating_keys, lerp_states, load_merged, restored_on_error
from .wise_ft import _metrics

__all__ = ["uniform_soup", "greedy_soup", "GreedySoup"]


def _ingredients(states: Sequence[StateLike]) -> list[dict[str, Tensor]]:
    if not isinstance(states, (nn.Module, Mapping, Sequence)) or isinstance(states, (str, bytes)):
        raise FineregError(
            f"states must be a list (or tuple) of models or state dicts (the soup's ingredients), got "
            f"{type(states).__name__}" + (": pass list(...) of it" if isinstance(states, Iterable) else "")
        )
    if isinstance(states, (nn.Module, Mapping)) or not len(states):
        raise FineregError("states must be a non-empty list of models or state dicts (the soup's ingredients)")
    first = as_state(states[0], "states[0]")
    return [first] + [aligned(first, as_state(s, f"states[{i}]"), f"states[{i}]") for i, s in enumerate(states) if i]


def uniform_soup(states: Sequence[StateLike]) -> dict[str, Tensor]:
    """The average of the ingredients' floating-point entries (a state dict with the first one's keys)."""
    items = _ingredients(states)
    keys = floating_keys(items[0])
    soup = {k: v.clone() for k, v in items[0].items()}
    for n, s in enumerate(items[1:], start=1):
        soup = lerp_states(s, soup, n / (n + 1), keys)  # soup + 1/(n+1)·(s − soup)
    return soup


@dataclass
class GreedySoup:
    """The result of :func:`greedy_soup`: the kept ingredients (indices into ``states``, in the order added),
    each ingredient's validation score, the soup's score, and its weights (loaded into the model)."""

    ingredients: list[int]
    scores: list[float]
    score: float
    state: dict[str, Tensor] = field(repr=False)


def greedy_soup(
    model: nn.Module,
    states: Sequence[StateLike],
    evaluate: Callable[[nn.Module], float | Mapping[str, float]],
    *,
    select: str | None = None,
    maximize: bool = True,
    bn_batches: Iterable | None = None,
) -> GreedySoup:
    """The greedy soup (see the module docstring), chosen with ``evaluate(model)`` on a validation split.

    Args:
        model: the module the weights load into.
        states: the ingredients (modules or state dicts of one architecture).
        evaluate: returns the validation metric (or a mapping of metrics, with ``select`` naming it).
        maximize: the larger metric wins (False for a loss).
        bn_batches: batches to recompute BatchNorm statistics before each evaluation.
    """
    if not callable(evaluate):
        raise FineregError("evaluate must be a callable: evaluate(model) -> validation metric")
    sign = 1.0 if check_bool(maximize, "maximize") else -1.0
    items = [{k: v.clone() for k, v in s.items()} for s in _ingredients(states)]
    keys = floating_keys(items[0])

    def score(state: dict[str, Tensor]) -> float:
        load_merged(model, state, bn_batches)
        with torch.no_grad():
            return _metrics(evaluate(model), select)["score"]

    with restored_on_error(model):  # evaluate may raise (Ctrl-C included): the model keeps its weights
        scores = [score(s) for s in items]
        order = sorted(range(len(items)), key=lambda i: (-sign * scores[i], i))
        soup, kept, best = items[order[0]], [order[0]], scores[order[0]]
        for i in order[1:]:
            candidate = lerp_states(items[i], soup, len(kept) / (len(kept) + 1), keys)
            s = score(candidate)
            if sign * s > sign * best:
                soup, best = candidate, s
                kept.append(i)
        load_merged(model, soup, bn_batches)
    return GreedySoup(kept, scores, best, {k: v.detach().clone() for k, v in model.state_dict().items()})
