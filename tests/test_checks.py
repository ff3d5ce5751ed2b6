"""finereg._checks: one message shape, error classes that are also the builtin types callers catch."""

import math

import pytest

from finereg._checks import (
    FineregError,
    FineregIndexError,
    FineregTypeError,
    UnknownNameError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_type,
)


def test_error_classes_are_also_the_builtin_types():
    assert issubclass(FineregError, ValueError)
    assert issubclass(FineregTypeError, FineregError) and issubclass(FineregTypeError, TypeError)
    assert issubclass(UnknownNameError, FineregError) and issubclass(UnknownNameError, KeyError)
    assert issubclass(FineregIndexError, FineregError) and issubclass(FineregIndexError, IndexError)
    assert str(UnknownNameError("no layer named 'x'")) == "no layer named 'x'"  # no KeyError quotes


def test_check_number():
    assert check_number(2, "lr", low=0, low_open=True) == 2.0
    with pytest.raises(FineregError, match=r"^lr must be a finite number > 0, got 0$"):
        check_number(0, "lr", low=0, low_open=True)
    with pytest.raises(FineregTypeError, match=r"^lr must be a finite number, got '1'$"):
        check_number("1", "lr")
    with pytest.raises(FineregTypeError, match="got True"):
        check_number(True, "lr")
    with pytest.raises(FineregError, match="got nan"):
        check_number(math.nan, "lr", finite=False)
    assert check_number(math.inf, "x", finite=False) == math.inf
    with pytest.raises(FineregError, match=r"^m must be a finite number >= 0 and <= 1, got 1.5$"):
        check_number(1.5, "m", low=0, high=1)


def test_check_int_bool_choice_type():
    assert check_int(2.0, "k", low=1) == 2
    with pytest.raises(FineregError, match=r"^k must be an integer >= 1, got 2.7$"):
        check_int(2.7, "k", low=1)
    with pytest.raises(FineregTypeError, match="got True"):
        check_int(True, "k")
    assert check_bool(False, "strict") is False
    with pytest.raises(FineregTypeError, match=r"^strict must be True or False, got 1$"):
        check_bool(1, "strict")
    assert check_choice("a", "mode", ("a", "b")) == "a"
    with pytest.raises(FineregError, match=r"^mode must be one of 'a', 'b', got 'c'$"):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(FineregTypeError, match=r"^model must be an nn.Module, got str$"):
        check_type("x", "model", int, "an nn.Module")
