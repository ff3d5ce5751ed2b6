"""Shared fixtures: the golden reference vectors (tests/data) and small helpers."""

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden():
    """tllib's reference numbers (see tests/data/GOLDEN.md)."""
    return torch.load(DATA / "tllib_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def keras_golden():
    """Keras 3 OrthogonalRegularizer reference values."""
    return torch.load(DATA / "keras_orthogonal.pt", weights_only=True)


def build_arch(case, params_key="params"):
    """Rebuild a golden case's module from its ``arch`` string, in float64, with its parameters."""
    model = eval(case["arch"], {"nn": nn}).double()
    state = dict(case.get(params_key, {}))
    state.update(case.get("buffers", {}))
    if state:
        model.load_state_dict(state)
    return model


@pytest.fixture(name="build_arch", scope="session")
def _build_arch_fixture():
    """The :func:`build_arch` helper as a fixture (``def test_x(golden, build_arch): ...``)."""
    return build_arch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the tests of a module (tiny ops: avoids OpenMP wake-up costs on a busy CI
    machine); the previous count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
