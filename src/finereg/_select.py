"""Glob selection of names (parameters, modules) with one rule: a pattern that matches nothing is an error.

Patterns are ``fnmatch`` globs matched case-sensitively against whole names: ``"layer3.*.conv2"``, ``"*.bias"``,
``"fc.*"``; ``*`` also crosses dots. A typo in a pattern would otherwise silently select nothing (and a
regularizer or a conversion would do nothing), so every pattern must match at least one name, and the error lists
the names that look closest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

from ._checks import FineregError, FineregTypeError
from ._utils import strip_prefixes, unknown_name_error, unwrap

__all__ = ["Patterns", "match_names", "patterns", "select_names", "select_modules"]

Patterns = str | Sequence[str] | None


def match_names(names: Sequence[str], patterns: str | Sequence[str] | None) -> list[str]:
    """The names (in their order) matching any glob pattern; ``None`` matches every name. No check."""
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def patterns(arg: Patterns, label: str, example: str = "'layer1.*' or ['conv1', '*.bias']") -> list[str] | None:
    """``arg`` (one glob or a list of globs, or None) as a list of strings without wrapper prefixes, checked."""
    if arg is None:
        return None
    if isinstance(arg, str):
        arg = [arg]
    if not isinstance(arg, (list, tuple)) or not all(isinstance(p, str) for p in arg):
        raise FineregTypeError(
            f"{label} must be a glob pattern or a list of glob patterns (e.g. {example}), got {arg!r}"
        )
    return [strip_prefixes(p) for p in arg]


def select_names(names: Sequence[str], pats: Patterns, label: str, kind: str, hint: str = "") -> list[str]:
    """The names matching any of ``pats`` (in the order of ``names``); ``None`` selects nothing.

    Every pattern must match at least one name: otherwise an :class:`~finereg._checks.UnknownNameError` (a
    ``KeyError``) names the pattern, the ``kind`` of names (``"parameter"``) and the closest names.
    """
    checked = patterns(pats, label)
    if checked is None:
        return []
    for p in checked:
        if not match_names(names, p):
            what = f"{label} pattern {p!r} matches no {kind}"
            raise unknown_name_error(kind, p, [n for n in names if n], hint=hint, what=what)
    return match_names(names, checked)


def select_modules(
    model: nn.Module,
    is_candidate: Callable[[nn.Module], bool],
    include: Patterns,
    exclude: Patterns,
    kind: str,
    hint: str = "",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of ``model`` that are candidates, match ``include`` (default: all) and not ``exclude``.

    Every pattern must match a module name (an :class:`~finereg._checks.UnknownNameError` listing close names
    otherwise); an ``include`` pattern must also match at least one candidate (``kind`` names them in the error,
    ``hint`` is appended to it).
    """
    if not isinstance(model, nn.Module):
        raise FineregTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = list(unwrap(model).named_modules())
    names = [n for n, _ in named]
    by_name = dict(named)
    cand = [(n, m) for n, m in named if is_candidate(m)]
    globs = "(patterns are globs over model.named_modules() names)"
    inc = select_names(names, include, "include", "module", globs)
    exc = set(select_names(names, exclude, "exclude", "module", globs))
    if include is not None:
        for p in patterns(include, "include"):
            if not any(is_candidate(by_name[n]) for n in match_names(names, p)):
                hits = match_names(names, p)
                shown = ", ".join(f"{h!r} ({type(by_name[h]).__name__})" for h in hits[:5])
                raise FineregError(f"include pattern {p!r} matches {shown} but no {kind}{hint}")
    keep = set(inc) if include is not None else None
    return [(n, m) for n, m in cand if (keep is None or n in keep) and n not in exc]
