"""The registered engine methods by name: lookups, parsing of ``--method`` and ``--set``, building a run's recipes
and checking that they can run together. The framework (:class:`~finereg.train.recipe.Recipe`, :class:`HP`) is in
:mod:`finereg.train.recipe`, the recipes in :mod:`finereg.train.recipes`.

Methods combine with ``+`` (``l2sp+bss``); hyper-parameters are changed with ``--set method.key=value``, each
value checked against its :class:`~finereg.train.recipe.HP` spec (type and range). Combinations are checked
generally (:func:`check_combination`): two recipes claiming one part of training, or a declared conflict, are a
:class:`FineregError` naming both.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import FineregError
from .._utils import unknown_name_error
from . import recipes as _recipes  # noqa: F401  (registers the recipes)
from .recipe import ALIASES, CLAIMS, GROUPS, REGISTRY, Recipe, claims_of
from .recipes.weight import HeadL2

__all__ = [
    "method_names",
    "method_groups",
    "registered",
    "method_aliases",
    "parse_method",
    "parse_methods",
    "parse_overrides",
    "settings_for",
    "build_recipes",
    "check_combination",
    "default_weight_decay",
]


def method_names(group: str | None = None) -> list[str]:
    """The registered methods, in registration order (those of one bench ``group``, a key of :data:`GROUPS`)."""
    if group is not None and group not in GROUPS:
        raise unknown_name_error("method group", group, list(GROUPS), hint=f"(groups: {', '.join(GROUPS)}, all)")
    return [n for n, cls in REGISTRY.items() if group is None or cls.group == group]


def method_groups() -> dict[str, str]:
    """The bench's method groups → what they hold (``all`` is every method)."""
    return dict(GROUPS)


def parse_methods(specs: Sequence[str]) -> list[str]:
    """A bench's ``--methods`` list, each entry a method or combination (``l2sp+bss``; aliases resolved to the
    registry's spelling) or a group (``tllib``, ``robust``, ``all``: its methods in registration order)."""
    out: list[str] = []
    for spec in specs:
        key = spec.strip().lower()
        if key == "all":
            out += method_names()
        elif key in GROUPS:
            out += method_names(key)
        else:
            out.append("+".join(parse_method(spec)))
    return out


def registered(name: str) -> type[Recipe]:
    """The recipe class of a registered method (aliases accepted)."""
    return REGISTRY[parse_method(name)[0]]


def method_aliases() -> dict[str, str]:
    """Other accepted spellings (tllib's script options and common variants) → registry name."""
    return dict(ALIASES)


def _normalize(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    return ALIASES.get(n, n)


def parse_method(spec: str) -> list[str]:
    """``'l2sp+bss'`` → ``['l2sp', 'bss']`` (registry names; aliases such as ``delta:attention`` accepted)."""
    registry = REGISTRY
    if not spec or not spec.strip():
        raise FineregError(f"empty method; choose from {', '.join(registry)} (combine with +)")
    names = [_normalize(p) for p in spec.split("+")]
    if "" in names:
        raise FineregError(f"method {spec!r} has an empty part; join method names with single '+', e.g. l2sp+bss")
    for n in names:
        if n not in registry:
            raise unknown_name_error(
                "method", n, list(registry), hint=f"(methods: {', '.join(registry)}; combine with +, e.g. l2sp+bss)"
            )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FineregError(f"method {dup[0]!r} appears twice in {spec!r}")
    if "erm" in names and len(names) > 1:
        names.remove("erm")
    return names


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``['bss.trade_off=0.01', 'lwf.temperature=2']`` (or a mapping) → ``{'bss': {'trade_off': 0.01}, ...}``;
    values are read as Python literals where they are one (``2`` → int, ``True``, ``'a'``), else kept as text."""
    out: dict[str, dict[str, Any]] = {}
    if not items:
        return out
    pairs = items.items() if isinstance(items, Mapping) else [_split_set(s) for s in items]
    for key, value in pairs:
        method, dot, hp = key.partition(".")
        if not dot or not hp:
            raise FineregError(f"--set {key}={value}: write method.key=value, e.g. bss.trade_off=0.001")
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        out.setdefault(_normalize(method), {})[hp] = value
    return out


def settings_for(spec: str, settings: Any, specs: Sequence[str] = ()) -> Any:
    """The entries of ``settings`` (``--set``'s list of ``method.key=value`` or a mapping ``{"bss.trade_off":
    0.01}``) that concern the methods of ``spec``, so that one ``--set`` serves a bench of several methods. A
    setting that concerns none of ``specs`` (all the bench's methods; default: ``spec``) is an error."""
    names = {n: parse_method(n) for n in {spec, *specs}}
    with_head = {n for n, ms in names.items() if any(REGISTRY[m].head_l2 for m in ms)}
    items = list(settings.items()) if isinstance(settings, Mapping) else list(settings or [])

    def method_of(item: Any) -> str:
        key = item[0] if isinstance(item, tuple) else _split_set(str(item))[0]
        return _normalize(str(key).partition(".")[0])

    def concerns(item: Any, n: str) -> bool:
        m = method_of(item)
        return m in names[n] or (m == "head-l2" and n in with_head)

    for item in items:
        if not any(concerns(item, n) for n in names):
            raise FineregError(
                f"--set {item[0] if isinstance(item, tuple) else item}: no method of the run is {method_of(item)!r} "
                f"(methods: {', '.join(sorted(names))})"
            )
    kept = [item for item in items if concerns(item, spec)]
    return dict(kept) if isinstance(settings, Mapping) else kept


def _split_set(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise FineregError(f"--set {item!r}: write method.key=value, e.g. bss.trade_off=0.001")
    return key.strip(), value.strip()


def build_recipes(
    spec: str, overrides: Mapping[str, Mapping[str, Any]] | None = None, *, data: str | None = None
) -> list[Recipe]:
    """The recipes of ``spec`` with their overrides (over the recipes' ``data_defaults`` for ``data``, over their
    defaults otherwise); checks that the combination can run together."""
    registry = REGISTRY
    names = parse_method(spec)
    overrides = dict(overrides or {})
    extra = {"head-l2"} if any(registry[n].head_l2 for n in names) else set()
    stray = sorted(set(overrides) - set(names) - {"head-l2"})
    if stray:
        raise FineregError(
            f"--set names method {stray[0]!r}, which is not in {spec!r} (methods here: "
            f"{', '.join([*names, *sorted(extra)])})"
        )
    recipes = [registry[n](**{**registry[n].data_defaults.get(data or "", {}), **overrides.get(n, {})}) for n in names]
    check_combination(recipes)
    head_l2 = 0.0 if any(r.decays_head for r in recipes) else max((r.head_l2 for r in recipes), default=0.0)
    if head_l2 or "head-l2" in overrides:
        recipes.append(HeadL2(**{"trade_off": head_l2, **overrides.get("head-l2", {})}))
    return recipes


def check_combination(recipes: Sequence[Recipe]) -> None:
    """Raise :class:`FineregError` when the recipes cannot run together: two claim one part of training
    (:data:`CLAIMS`), one declares a conflict with another, or one replaces the network's forward while another
    reads what that forward no longer gives (pooled features, source-head logits)."""
    claimed: dict[str, str] = {}
    for r in recipes:
        for c in sorted(claims_of(r)):
            if c in claimed:
                raise FineregError(
                    f"{claimed[c]} and {r.name} both {CLAIMS[c]}; they cannot be combined: keep one of them"
                )
            claimed[c] = r.name
    names = [r.name for r in recipes]
    for r in recipes:
        for other, why in r.conflicts.items():
            if other in names:
                raise FineregError(f"{r.name} cannot be combined with {other}: {why}")
    if "forward" in claimed:
        # methods that read what the wrapper's forward does not give: pooled features, source-head logits
        clash = [r.name for r in recipes if r.needs_features or type(r).prepare is not Recipe.prepare]
        if clash:
            raise FineregError(
                f"{claimed['forward']} replaces the network's forward, which then gives neither pooled features nor "
                f"source-head outputs; it cannot be combined with {', '.join(clash)}"
            )


def default_weight_decay(recipes: list[Recipe]) -> float:
    """tllib's SGD weight decay for the methods: 0 when one of them replaces it by an explicit penalty
    (DELTA's script: L2-SP, DELTA), else 5e-4."""
    return min((r.weight_decay for r in recipes), default=Recipe.weight_decay)
