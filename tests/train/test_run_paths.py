"""What a command reads and where it writes (issue 17 items 9, 15, 20): ``finereg wise-ft`` sweeps the checkpoint it
is given and gives its own advice; the folders finereg writes into come from the current command and environment,
never from a run directory's stored config."""

import dataclasses
import os

import pytest

from finereg._checks import FineregError
from finereg.train.checkpoint import LAST, PREV, atomic_save, load_checkpoint
from finereg.train.cli import main
from finereg.train.config import FitConfig, merge_resume
from finereg.train.loop import fit
from finereg.train.wise_ft import wise_ft_run

QUIET = dict(log=lambda m: None)


def _extended_run(tmp_path, tiny):
    """A run of 1 epoch resumed to 2: ``prev.pt`` is the finished 1-epoch run, ``last.pt`` the 2-epoch one."""
    first = fit(tiny(tmp_path, epochs=1), **QUIET)
    second = fit(tiny(tmp_path, epochs=2, out=None, resume=str(first.run_dir)), **QUIET)
    run = second.run_dir
    assert load_checkpoint(run / PREV)["epoch"] == 1 and load_checkpoint(run / LAST)["epoch"] == 2
    return run, first.final, second.final


def test_wise_ft_sweeps_the_checkpoint_it_is_given(tmp_path, tiny):
    """``finereg wise-ft RUN/prev.pt`` swept ``last.pt``: α = 1 is now the network of the checkpoint named."""
    run, first, second = _extended_run(tmp_path, tiny)
    assert first["test_loss"] != second["test_loss"]
    logs = []
    res = wise_ft_run(run / PREV, [1], log=logs.append)
    assert res.rows[-1]["test_loss"] == first["test_loss"] and res.rows[-1]["test_top1"] == first["test_top1"]
    assert any(f"sweeping {run / PREV} (epoch 1)" in m for m in logs)
    assert wise_ft_run(run, [1], **QUIET).rows[-1]["test_loss"] == second["test_loss"]  # a directory: last.pt


def test_wise_ft_of_an_unfinished_checkpoint_beside_a_finished_run_says_which_to_sweep(tmp_path, tiny):
    res = fit(tiny(tmp_path, epochs=2), **QUIET)
    with pytest.raises(FineregError, match=r"prev.pt' is not finished \(epoch 1 of 2\): sweep the run's last"):
        wise_ft_run(res.run_dir / PREV, [1], **QUIET)


def test_wise_ft_advice_for_a_corrupt_checkpoint_is_about_wise_ft(tmp_path, tiny, capsys):
    run, _, _ = _extended_run(tmp_path, tiny)
    data = (run / LAST).read_bytes()
    (run / LAST).write_bytes(data[: len(data) // 2])
    assert main(["wise-ft", str(run), "--alphas", "1"]) == 2
    err = capsys.readouterr().err
    assert f"sweep it with finereg wise-ft {run / PREV}" in err and "--resume" not in err
    (run / PREV).write_bytes(data[:100])
    assert main(["wise-ft", str(run), "--alphas", "1"]) == 2
    err = capsys.readouterr().err
    assert "damaged too" in err and "then run finereg wise-ft" in err and "another --out" not in err


def test_wise_ft_advice_for_an_unfinished_previous_checkpoint(tmp_path, tiny, capsys):
    res = fit(tiny(tmp_path, epochs=2), **QUIET)
    (res.run_dir / LAST).write_bytes(b"not a checkpoint")
    assert main(["wise-ft", str(res.run_dir), "--alphas", "1"]) == 2
    err = capsys.readouterr().err
    assert f"finish the run from it with finereg fit --resume {res.run_dir / PREV}, then run finereg wise-ft" in err


def test_wise_ft_on_a_directory_without_a_run_says_what_wise_ft_needs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["wise-ft", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and "finereg fit finished" in err and "without --resume" not in err
    assert os.listdir(tmp_path / "empty") == []  # no lock file left behind


def _foreign(run, elsewhere):
    """The run's checkpoint as a run directory from someone else could hold it: its config names a cache folder."""
    ckpt = load_checkpoint(run)
    ckpt["config"]["cache_dir"] = str(elsewhere)
    atomic_save(ckpt, run / LAST)


def test_wise_ft_and_resume_never_write_where_the_stored_config_says(tmp_path, tiny):
    """``cache_dir`` came from the checkpoint: finereg pretrained the built-in source model into the folder a run
    directory chose. It comes from the command (``--cache-dir``) or the environment (``$FINEREG_CACHE``)."""
    res = fit(tiny(tmp_path, epochs=1), **QUIET)
    elsewhere = tmp_path / "chosen-by-the-run"
    _foreign(res.run_dir, elsewhere)
    wise_ft_run(res.run_dir, [0, 1], **QUIET)
    assert not elsewhere.exists()
    fit(tiny(tmp_path, epochs=2, out=None, resume=str(res.run_dir)), **QUIET)
    assert not elsewhere.exists()
    assert load_checkpoint(res.run_dir)["config"]["cache_dir"] is None  # the resumed run's own: the environment's


def test_merge_resume_takes_paths_from_the_command():
    saved = dataclasses.asdict(FitConfig(cache_dir="/theirs"))
    assert merge_resume(FitConfig(resume=True), saved).cache_dir is None
    assert merge_resume(FitConfig(resume=True, cache_dir="/mine"), saved).cache_dir == "/mine"
    assert merge_resume(FitConfig(resume=True), {**saved, "epochs": 3}).epochs == 3  # other fields: the run's


def test_wise_ft_cache_dir_option_is_used(tmp_path, tiny, monkeypatch):
    import finereg.train.wise_ft as wf

    res = fit(tiny(tmp_path, epochs=1), **QUIET)
    seen = []
    build_task = wf.build_task
    monkeypatch.setattr(wf, "build_task", lambda cfg, log: seen.append(cfg.cache_dir) or build_task(cfg, log))
    assert main(["wise-ft", str(res.run_dir), "--alphas", "1", "--cache-dir", os.environ["FINEREG_CACHE"]]) == 0
    assert seen == [os.environ["FINEREG_CACHE"]]
