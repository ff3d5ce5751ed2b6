"""The run configuration: every option's type and range is checked up front, before any work."""

from finereg.train.cli import main

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--no-tensorboard", "--sample-rate", "30"]


def test_device_and_lr_are_checked_up_front(tmp_path, capsys):
    assert main(["fit", "--device", "tpu", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "unknown device 'tpu': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["fit", "--lr", "nan", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "--lr must be a finite number > 0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind
