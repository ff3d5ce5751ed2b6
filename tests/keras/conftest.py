"""Fixtures of the Keras front's tests; they run on whichever backend KERAS_BACKEND selects (torch in the main
test process, JAX in the subprocess started by test_backends.py)."""

import keras
import pytest
import torch


@pytest.fixture(autouse=True)
def _keras_state():
    """A fixed Keras seed per test, one torch thread (tiny ops on a shared machine)."""
    keras.utils.set_random_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
