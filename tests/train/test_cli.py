"""The finereg command: fit, methods, demo, bad input -> clear errors and exit codes."""

import os
import re

import pytest

from finereg._checks import FineregError
from finereg.train.checkpoint import load_checkpoint
from finereg.train.cli import main

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--sample-rate", "30"]


def test_fit_and_resume_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["fit", "--out", out, "--no-tensorboard", *TINY]) == 0
    assert load_checkpoint(out)["epoch"] == 1
    assert "done: top-1" in capsys.readouterr().out
    assert main(["fit", "--resume", out, "--epochs", "2", "--no-progress"]) == 0
    ck = load_checkpoint(out)
    assert ck["epoch"] == 2 and ck["config"]["sample_rate"] == 30 and ck["config"]["batch_size"] == 16


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["fit", "--method", "l2spp", "--out", str(tmp_path / "a"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finereg fit: error: no method named 'l2spp'") and "Traceback" not in err
    assert main(["fit", "--arch", "resnet19", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["fit", "--set", "nodot=1", "--out", str(tmp_path / "c"), *TINY]) == 2
    assert "write method.key=value" in capsys.readouterr().err
    assert main(["fit", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([]) == 2


def test_methods_lists_the_registry(capsys):
    from finereg.train.methods import method_names

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in method_names())


def test_demo_runs_l2sp_delta_bss(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo: l2sp+delta+bss fine-tuned" in out
    ck = load_checkpoint(tmp_path / "demo")
    assert ck["epoch"] == 6 and {"train_l2sp", "train_delta", "train_bss", "train_l2_head"} <= set(ck["history"][-1])
    assert "epoch 6/6:" in out and "train_delta=" in out  # the loss terms of each epoch are shown


def test_os_errors_are_one_clear_line(tmp_path, capsys):
    """Before: a read-only or impossible --out gave a traceback."""
    (tmp_path / "file").write_text("x")
    assert main(["fit", "--out", str(tmp_path / "file" / "run"), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finereg fit: error: Not a directory: ") and "Traceback" not in err and err.count("\n") == 1
    if os.path.isdir("/sys"):  # sysfs refuses new directories, even to root: a read-only --out
        assert main(["fit", "--out", "/sys/finereg-test-run", "--epochs", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(
            r"finereg fit: error: (Operation not permitted|Permission denied): /sys/finereg-test-run\n", err
        )


def test_method_spelling_errors_and_aliases(tmp_path, capsys):
    assert main(["fit", "--method", "l2sp+", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "has an empty part; join method names with single '+'" in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "l2-sp (= l2sp)" in capsys.readouterr().out


def test_debug_shows_the_traceback_and_unexpected_errors_keep_theirs(tmp_path, capsys, monkeypatch):
    with pytest.raises(FineregError, match="--epochs must be an integer >= 1"):
        main(["--debug", "fit", "--epochs", "0", "--out", str(tmp_path / "a")])
    monkeypatch.setenv("FINEREG_DEBUG", "1")
    with pytest.raises(FineregError):
        main(["fit", "--epochs", "0", "--out", str(tmp_path / "a")])
    monkeypatch.delenv("FINEREG_DEBUG")
    assert main(["fit", "--epochs", "0", "--out", str(tmp_path / "a")]) == 2  # the expected error: one line

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("finereg.train.loop.build", bug)
    with pytest.raises(ZeroDivisionError):  # not swallowed into one line
        main(["fit", "--out", str(tmp_path / "b"), *TINY])
    assert not (tmp_path / "b").exists()


# --- finereg wise-ft (issue 11) ---------------------------------------------------------------------------
def test_wise_ft_refuses_a_busy_or_unfinished_run_and_bad_alphas(tmp_path, tiny, capsys):
    from finereg.train.loop import fit
    from finereg.train.run_dir import DirLock

    QUIET = dict(log=lambda m: None)
    res = fit(tiny(tmp_path / "a", method="erm", epochs=1), **QUIET)
    with DirLock(res.run_dir):
        assert main(["wise-ft", str(res.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finereg wise-ft: error: run directory") and "in use by another finereg process" in err
    assert not (res.run_dir / "wise_ft.csv").exists()

    def stop(info):
        raise KeyboardInterrupt

    part = fit(tiny(tmp_path / "b", method="erm"), on_step=stop, **QUIET)
    assert main(["wise-ft", str(part.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "is not finished (epoch 0 of 2, step 1): finish it with finereg fit --resume" in err
    assert main(["wise-ft", str(res.run_dir), "--alphas", "0,2"]) == 2
    assert "each of --alphas must be a finite number >= 0 and <= 1, got 2.0" in capsys.readouterr().err
    assert main(["wise-ft", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
