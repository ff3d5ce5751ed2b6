"""Argument validation with one message shape, and the base class of expected user errors.

Every public function checks its inputs with these helpers, as Keras' regularizers validate theirs with one
function: a bad value raises :class:`FineregError` (a ``ValueError``; :class:`FineregTypeError`, also a
``TypeError``, when the value has the wrong type) reading ``"<name> must be <rule>, got <value>"``, so the command
line can print it as one clear line while anything unexpected keeps its traceback.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = [
    "FineregError",
    "FineregTypeError",
    "FineregIndexError",
    "UnknownNameError",
    "MissingFileError",
    "MissingDependencyError",
    "FineregWarning",
    "check_number",
    "check_int",
    "check_choice",
    "check_bool",
    "check_type",
    "require_module",
]


class FineregError(ValueError):
    """An expected error caused by the user's input (a bad argument, file or setting); its message says what is
    wrong and how to fix it. The ``finereg`` command prints it as one line; other exceptions keep their traceback."""


class FineregTypeError(FineregError, TypeError):
    """An argument of the wrong type (a string where a number belongs, a tensor where a module belongs ...). Also a
    ``TypeError``, the builtin type such errors had before, so code that catches that keeps working."""


class FineregIndexError(FineregError, IndexError):
    """An index out of range (e.g. an output unit a layer does not have). Also an ``IndexError``."""


class FineregWarning(UserWarning):
    """A call that did nothing or less than asked (e.g. a conversion that found nothing to convert)."""


class UnknownNameError(FineregError, KeyError):
    """A name (module, parameter, method, architecture ...) that does not exist; the message lists close matches.
    Also a ``KeyError``, so code that looks names up in mappings can catch it as one."""

    def __str__(self) -> str:  # KeyError would print the message with extra quotes
        return str(self.args[0]) if self.args else ""


class MissingFileError(FineregError, FileNotFoundError):
    """A file or directory the user named that does not exist (also a ``FileNotFoundError``)."""


class MissingDependencyError(FineregError, ImportError):
    """An optional package a feature needs is not installed; the message names the ``pip install`` to run."""


def _rule(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float, checked: a real number (not a bool), finite unless ``finite=False``, and inside the
    bounds (``low <= value <= high``; ``low_open`` / ``high_open`` make them strict)."""
    rule = _rule(low, high, low_open, high_open)
    what = "a finite number" if finite else "a number"
    if rule:
        what += f" {rule}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FineregTypeError(f"{name} must be {what}, got {value!r}")
    v = float(value)
    if (finite and not math.isfinite(v)) or math.isnan(v):
        raise FineregError(f"{name} must be {what}, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise FineregError(f"{name} must be {what}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise FineregError(f"{name} must be {what}, got {value!r}")
    return v


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, checked: an integer (``2.0`` is accepted, ``2.7`` and ``True`` are not) inside
    ``[low, high]``. A value that is not a number at all raises :class:`FineregTypeError`."""
    what = "an integer" + (f" {_rule(low, high, False, False)}" if low is not None or high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FineregTypeError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        v = int(value)
    else:
        raise FineregError(f"{name} must be {what}, got {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise FineregError(f"{name} must be {what}, got {value!r}")
    return v


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise FineregError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (``0`` / ``1`` and strings are refused: they hide typos)."""
    if not isinstance(value, bool):
        raise FineregTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_type(value: Any, name: str, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is an instance of ``types``; ``what`` describes them in the message (``"an nn.Module"``)."""
    if not isinstance(value, types):
        raise FineregTypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def require_module(module: str, what: str, pip: str, otherwise: str = "") -> None:
    """Import ``module`` (an optional package) up front, before any work that needs it, or raise
    :class:`MissingDependencyError`: ``"<what> needs <package>: pip install <pip>[; <otherwise>]"``."""
    try:
        importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingDependencyError(
            f"{what} needs {package}: pip install {pip}" + (f"; {otherwise}" if otherwise else "")
        ) from None
