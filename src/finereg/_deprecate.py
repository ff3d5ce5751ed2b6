"""Renamed public arguments keep working for one minor version (README, Conventions).

``@renamed(T="temperature", since="0.2")`` on a function (or an ``__init__``) accepts the old keyword ``T`` with a
``FutureWarning`` naming the new one, and passes its value on as ``temperature``; passing both is a
:class:`~finereg._checks.FineregTypeError`. :func:`renamed_attribute` does the same for an attribute. The old
names are removed in the next minor version (``removal``); ``CHANGELOG.md`` lists them.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ._checks import FineregTypeError

__all__ = ["renamed", "renamed_attribute", "next_minor"]

F = TypeVar("F", bound=Callable[..., Any])


def next_minor(since: str) -> str:
    """The version that removes what ``since`` deprecated: ``"0.2"`` → ``"0.3"``."""
    major, minor = since.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


def renamed(*, since: str, **old_to_new: str) -> Callable[[F], F]:
    """Accept each old keyword argument (``old="new"``) for one minor version, with a ``FutureWarning``."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        missing = [new for new in old_to_new.values() if new not in sig.parameters]
        if missing:  # a typo here would silently drop the user's value
            raise TypeError(f"{fn.__qualname__} has no parameter {missing[0]!r}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                name = type(args[0]).__name__ if fn.__name__ == "__init__" and args else fn.__qualname__
                if new in kwargs or new in sig.bind_partial(*args).arguments:
                    raise FineregTypeError(
                        f"{name}() got both {old!r} (the old name of {new!r}, renamed in finereg {since}) and "
                        f"{new!r}: pass {new}= only"
                    )
                warnings.warn(
                    f"{name}(): the argument {old!r} is now {new!r} (renamed in finereg {since}); {old}= still "
                    f"works until finereg {next_minor(since)}, pass {new}= instead",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(old: str, new: str, *, since: str) -> property:
    """A read-only property ``old`` returning ``self.<new>``, with a ``FutureWarning`` naming ``new``."""

    def get(self: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is now .{new} (renamed in finereg {since}); .{old} still works until "
            f"finereg {next_minor(since)}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated: the old name of ``{new}`` (renamed in {since}).")
