"""The engine's optional packages are checked up front (issue 17 item 17): without tqdm ``finereg fit`` died after its
set-up, without matplotlib ``finereg bench`` after all its runs. Now each is a clear error naming the ``pip
install`` before any work."""

import importlib
import sys

import pytest

from finereg._checks import MissingDependencyError, require_module
from finereg.train.cli import main
from finereg.train.loop import fit

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--sample-rate", "30", "--no-tensorboard"]


def _without(monkeypatch, *modules):
    """Make ``import <module>`` fail as it does where the package is not installed."""
    for m in list(sys.modules):
        if m.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, m)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _no_set_up(monkeypatch):
    import finereg.train.build as build
    import finereg.train.loop as loop

    def refuse(*a, **k):
        raise AssertionError("the set-up ran before the missing package was reported")

    monkeypatch.setattr(loop, "build", refuse)
    monkeypatch.setattr(build, "build_task", refuse)


def test_fit_without_tqdm_fails_before_its_set_up(tmp_path, tiny, monkeypatch, capsys):
    _without(monkeypatch, "tqdm")
    _no_set_up(monkeypatch)
    with pytest.raises(MissingDependencyError, match=r"progress bars needs tqdm: pip install tqdm .*--no-progress"):
        fit(tiny(tmp_path, progress=True), log=lambda m: None)
    assert not (tmp_path / "run").exists()  # the run directory it made is removed again
    assert main(["fit", *TINY, "--out", str(tmp_path / "cli")]) == 2
    assert "pip install tqdm" in capsys.readouterr().err


def test_fit_without_tqdm_runs_with_no_progress(tmp_path, tiny, monkeypatch):
    _without(monkeypatch, "tqdm")
    assert fit(tiny(tmp_path, epochs=1, progress=False), log=lambda m: None).epochs_done == 1


def test_bench_without_matplotlib_or_tqdm_fails_before_any_run(tmp_path, monkeypatch, capsys):
    bench = importlib.import_module("finereg.train.bench")  # not finereg.train.bench, the function
    _no_set_up(monkeypatch)
    monkeypatch.setattr(bench, "build_task", lambda *a, **k: pytest.fail("the bench started its work"))
    args = ["bench", "--protocol", "smoke", "--methods", "erm", "--rates", "30", "--seeds", "0", "-i", "2"]
    with monkeypatch.context() as m:
        _without(m, "matplotlib")
        assert main([*args, "--no-progress", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "finereg bench's plot needs matplotlib: pip install matplotlib" in err and not (tmp_path / "a").exists()
    _without(monkeypatch, "tqdm")
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "progress bar needs tqdm: pip install tqdm" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_require_module():
    require_module("math", "anything", "nothing")
    with pytest.raises(MissingDependencyError, match=r"^X needs no_such_pkg: pip install y; or z$"):
        require_module("no_such_pkg.sub", "X", "y", "or z")
