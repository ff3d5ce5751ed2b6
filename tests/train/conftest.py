"""Fixtures of the engine tests: a session cache with the built-in source model, one thread, tiny configs."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """``$FINEREG_CACHE`` pointing at a session directory where the built-in source model is pretrained once."""
    from finereg.train.builtin import pretrained_state

    cache = tmp_path_factory.mktemp("finereg-cache")
    old = os.environ.get("FINEREG_CACHE")
    os.environ["FINEREG_CACHE"] = str(cache)
    pretrained_state(log=lambda m: None)
    yield cache
    if old is None:
        os.environ.pop("FINEREG_CACHE", None)
    else:
        os.environ["FINEREG_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest (and steadiest beside other jobs) on one thread."""


@pytest.fixture
def tiny():
    """A FitConfig factory for runs of a second or two on the built-in task."""
    from finereg.train.loop import FitConfig

    def make(tmp_path, **kw):
        base = dict(
            out=str(tmp_path / "run"),
            epochs=2,
            iters_per_epoch=3,
            batch_size=16,
            progress=False,
            tensorboard=False,
            sample_rate=30,
        )
        base.update(kw)
        return FitConfig(**base)

    return make
