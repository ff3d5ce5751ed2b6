"""The run configuration: every option's type and range is checked up front, before any work."""

from finereg.train.cli import main

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--no-tensorboard", "--sample-rate", "30"]


def test_device_and_lr_are_checked_up_front(tmp_path, capsys):
    assert main(["fit", "--device", "tpu", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "unknown device 'tpu': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["fit", "--lr", "nan", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "--lr must be a finite number > 0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind


def test_an_image_folder_on_cpu_loads_in_process_and_channels_last_by_default():
    """Issue 22: on CPU 2 loader processes and the default format made an ImageFolder epoch 2.2x slower."""
    from finereg.train.config import FitConfig, resolve

    cpu, gpu = resolve(FitConfig(data="/some/folder"), 0.0), resolve(FitConfig(data="/some/folder"), 0.0, cpu=False)
    assert (cpu.workers, cpu.channels_last) == (0, True) and (gpu.workers, gpu.channels_last) == (2, False)
    mine = resolve(FitConfig(data="/some/folder", workers=3, channels_last=False), 0.0)
    assert (mine.workers, mine.channels_last) == (3, False)  # given values win
    assert resolve(FitConfig(data="digits"), 0.0).workers == 2 and FitConfig().workers is None


def test_a_batch_that_does_not_divide_a_small_training_set_is_said(tmp_path):
    from finereg.train.loop import FitConfig, fit
    from tests.train._util import image_folder

    image_folder(tmp_path / "data", per_class=3)  # 6 training images
    logs = []
    cfg = FitConfig(data=str(tmp_path / "data"), arch="builtin", weights="none", image_size=16, epochs=1,
                    iters_per_epoch=1, batch_size=4, out=str(tmp_path / "run"), progress=False,
                    tensorboard=False)  # fmt: skip
    fit(cfg, log=logs.append)
    assert any("batch 4 does not divide the 6 training images: each pass over them leaves 2 out" in m for m in logs)
    logs.clear()
    fit(FitConfig(**{**cfg.__dict__, "batch_size": 3, "out": str(tmp_path / "r2")}), log=logs.append)
    assert not any("does not divide" in m for m in logs)
