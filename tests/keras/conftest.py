"""Fixtures of the Keras front's tests; they run on whichever backend KERAS_BACKEND selects (torch in the main
test process, JAX in the subprocess started by test_backends.py)."""

import keras
import pytest
import torch


def pytest_collection_modifyitems(items):
    """Keras's torch backend converts tensors with np.array(tensor), which numpy 2 flags on every call."""
    here = str(__file__).rsplit("/", 1)[0]
    mark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(mark)


@pytest.fixture(autouse=True)
def _keras_state():
    """A fixed Keras seed per test, one torch thread (tiny ops on a shared machine)."""
    keras.utils.set_random_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
