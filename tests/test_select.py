"""finereg._select: glob selection where a pattern that matches nothing is an error listing close names."""

import pytest
from torch import nn

from finereg._checks import FineregError, FineregTypeError, UnknownNameError
from finereg._select import match_names, patterns, select_modules, select_names

NAMES = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.0.conv2.bias", "fc.weight"]


def test_match_names_keeps_order_and_crosses_dots():
    assert match_names(NAMES, None) == NAMES
    assert match_names(NAMES, "*.bias") == ["layer1.0.conv2.bias"]
    assert match_names(NAMES, ["fc.*", "conv1.*"]) == ["conv1.weight", "fc.weight"]  # the names' order
    assert match_names(NAMES, "layer1*weight") == ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    assert match_names(NAMES, "FC.*") == []  # case-sensitive


def test_select_names_every_pattern_must_match():
    assert select_names(NAMES, None, "include", "parameter") == []
    assert select_names(NAMES, ["fc.*", "*.bias"], "include", "parameter") == ["layer1.0.conv2.bias", "fc.weight"]
    with pytest.raises(UnknownNameError, match=r"exclude pattern 'fc\.wieght' matches no parameter.*'fc\.weight'"):
        select_names(NAMES, ["fc.*", "fc.wieght"], "exclude", "parameter")
    with pytest.raises(KeyError):  # also the builtin type
        select_names(NAMES, "nothing", "include", "parameter")


def test_patterns_checks_types_and_strips_wrapper_prefixes():
    assert patterns(None, "include") is None
    assert patterns("module.layer1.*", "include") == ["layer1.*"]
    with pytest.raises(FineregTypeError, match="include must be a glob pattern or a list of glob patterns"):
        patterns(3, "include")
    with pytest.raises(TypeError):
        patterns(["a", 1], "exclude")


def test_select_modules():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1), nn.Linear(2, 2)))
    conv = lambda m: isinstance(m, nn.Conv2d)
    assert [n for n, _ in select_modules(model, conv, None, None, "convolution")] == ["0", "2.0"]
    assert [n for n, _ in select_modules(model, conv, "2.*", None, "convolution")] == ["2.0"]
    assert [n for n, _ in select_modules(model, conv, None, "0", "convolution")] == ["2.0"]
    with pytest.raises(FineregError, match=r"include pattern '1' matches '1' \(ReLU\) but no convolution"):
        select_modules(model, conv, "1", None, "convolution")
    with pytest.raises(UnknownNameError, match=r"include pattern '3' matches no module"):
        select_modules(model, conv, "3", None, "convolution")
    with pytest.raises(FineregTypeError, match="model must be an nn.Module"):
        select_modules("model", conv, None, None, "convolution")
