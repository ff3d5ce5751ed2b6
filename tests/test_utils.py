"""finereg._utils: wrapper unwrapping, names and their errors, atomic writes, per-class ranks."""

import os

import pytest
import torch
from torch import nn

from finereg._checks import UnknownNameError
from finereg._utils import (
    atomic_write,
    class_ranks,
    close_matches,
    get_submodule,
    name_list,
    strip_prefixes,
    unknown_name_error,
    unwrap,
)


def test_unwrap_and_strip_prefixes():
    inner = nn.Sequential(nn.Linear(2, 2))
    assert unwrap(nn.DataParallel(inner)) is inner
    compiled = torch.compile(nn.DataParallel(inner), backend="eager")
    assert unwrap(compiled) is inner
    assert strip_prefixes("_orig_mod.module.0.weight") == "0.weight"
    assert strip_prefixes("layer.module.x") == "layer.module.x"  # only leading prefixes


def test_close_matches_and_unknown_name_error():
    names = ["layer1.0.conv1", "layer1.0.conv2", "fc"]
    assert sorted(close_matches("layer1.0.conv3", names)) == ["layer1.0.conv1", "layer1.0.conv2"]
    assert close_matches("conv2", names) == ["layer1.0.conv2"]  # substring fallback
    err = unknown_name_error("layer", "fx", names, hint="(see named_modules)")
    assert isinstance(err, UnknownNameError) and isinstance(err, KeyError)
    assert str(err) == "no layer named 'fx'; did you mean one of: 'fc'? (see named_modules)"
    err = unknown_name_error("layer", "zzz", [])
    assert "there are no layers to choose from" in str(err)
    assert str(unknown_name_error("x", "q", ["a"], what="custom start")).startswith("custom start; available: 'a'")


def test_get_submodule():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    assert get_submodule(nn.DataParallel(model), "module.0.0") is model[0][0]
    assert get_submodule(model, "") is model
    with pytest.raises(UnknownNameError, match=r"no submodule named '0\.1'.*'0\.0'"):
        get_submodule(model, "0.1")


def test_name_list():
    assert name_list("a", "layers", "e.g. x") == ["a"]
    with pytest.raises(ValueError, match="layers is empty"):
        name_list([], "layers", "e.g. x")
    with pytest.raises(TypeError, match="layers must be str"):
        name_list(["a", 1], "layers", "e.g. x")
    with pytest.raises(ValueError, match=r"layers given more than once: \['a'\]"):
        name_list(["a", "module.a"], "layers", "e.g. x")


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    assert atomic_write(path, lambda f: f.write(b"one")) == path
    assert path.read_bytes() == b"one"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"one"  # the old content survives
    assert os.listdir(path.parent) == ["f.bin"]  # no temporary file left behind
    tmp = atomic_write(path, lambda f: f.write(b"two"), replace=False)
    assert tmp != path and tmp.read_bytes() == b"two" and path.read_bytes() == b"one"


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_class_ranks(seed):
    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    ranks = class_ranks(labels, 4, generator=gen)
    assert ranks.dtype == torch.long
    for c in range(3):  # each class's ranks are 0..n_c-1, once each
        assert sorted(ranks[labels == c].tolist()) == list(range(int((labels == c).sum())))
    if seed is None:  # in the order of the samples
        assert ranks.tolist() == [0, 0, 1, 2, 0, 1, 3]
    assert class_ranks(torch.tensor([], dtype=torch.long)).numel() == 0


def test_class_ranks_random_order_is_seeded_and_nested():
    labels = torch.randint(0, 5, (200,))
    a = class_ranks(labels, generator=torch.Generator().manual_seed(3))
    b = class_ranks(labels, generator=torch.Generator().manual_seed(3))
    c = class_ranks(labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    small, large = (a < 2), (a < 5)
    assert (small <= large).all()  # the subset of 2 per class lies inside the subset of 5
