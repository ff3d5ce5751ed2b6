"""The Keras front on every installed Keras backend: the tests of tests/keras run again, each backend in a
process of its own (Keras fixes its backend at import). The main test process uses the torch backend; JAX is
part of the dev install and must pass; TensorFlow is tested when it is installed."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="once is enough (from the main test process)")
def test_import_finereg_does_not_import_keras():
    code = "import sys, finereg; bad = {'keras', 'jax', 'tensorflow'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="started once, from the torch-backend process")
@pytest.mark.parametrize("backend, module", [("jax", "jax"), ("tensorflow", "tensorflow")])
def test_keras_front_on_backend(backend, module):
    if importlib.util.find_spec(module) is None:
        if backend == "jax":
            pytest.fail("JAX is not installed: pip install -e '.[dev]' (the Keras front must be tested on JAX)")
        pytest.skip(f"{backend} is not installed")
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # XLA compiles the tiny test graphs several times faster
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    out = subprocess.run([*cmd, str(HERE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, f"the Keras front failed on the {backend} backend:\n{tail}"
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 40 and " failed" not in out.stdout, tail


def test_public_names_resolve():
    import finereg.keras as fk

    missing = [n for n in fk.__all__ if not hasattr(fk, n)]
    assert not missing and len(set(fk.__all__)) == len(fk.__all__), missing
    for name in ("WeightGroup", "Orthogonality", "SoftOrthogonality", "DoubleSoftOrthogonality", "MutualCoherence"):
        assert name in fk.__all__
    for name in ("SRIP", "freeze", "unfreeze", "StandardizedConv2D", "StandardizedDense", "standardize", "bake"):
        assert name in fk.__all__
