"""finereg.compat.keras.OrthogonalRegularizer against the golden values and Keras 3 itself."""

import math

import pytest
import torch
from torch import nn

from finereg.compat.keras import OrthogonalRegularizer
from finereg.weight.groups import WeightGroup
from finereg.weight.orthogonal import Orthogonality

keras = pytest.importorskip("keras")  # conftest sets KERAS_BACKEND=torch


def keras_value(factor, mode, tensor):
    """Keras's value on a backend (torch) tensor: what a Keras layer passes its regularizer (a variable).
    (Keras's numpy path is not used by layers and mis-normalizes columns: numpy's ``axis or -1`` turns 0 into -1.)"""
    return float(keras.regularizers.OrthogonalRegularizer(factor=factor, mode=mode)(tensor.detach().clone()))


def test_golden(keras_golden):
    for c in keras_golden["orthogonal"]:
        reg = OrthogonalRegularizer(factor=c["factor"], mode=c["mode"])
        torch.testing.assert_close(reg(c["matrix"]), c["value"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (8, 8), (2, 50)])
def test_equals_live_keras(mode, shape):
    x = torch.randn(shape)
    x[0] = 0  # a zero row: Keras's normalize floor (epsilon) path
    ours = OrthogonalRegularizer(0.05, mode)(x)
    assert math.isclose(float(ours), keras_value(0.05, mode, x), rel_tol=1e-5)


def test_conv_kernel_keras_layout():
    """Keras 3 refuses a conv kernel (rank 4); we take it as (kh·kw·in, filters), Keras's value on that."""
    kernel = torch.randn(3, 3, 8, 10)
    with pytest.raises(ValueError, match="rank 2"):
        keras.regularizers.OrthogonalRegularizer()(kernel)
    for mode in ("rows", "columns"):
        ours = OrthogonalRegularizer(0.01, mode)(kernel)
        assert math.isclose(float(ours), keras_value(0.01, mode, kernel.reshape(-1, 10)), rel_tol=1e-5)


def test_torch_layout_matches_keras_layout_and_core_penalty():
    conv = nn.Conv2d(8, 10, 3)
    keras_kernel = conv.weight.detach().permute(2, 3, 1, 0)  # (kh, kw, in, out), Keras's Conv2D layout
    reg = OrthogonalRegularizer(0.01, "columns")  # Keras columns = the 10 filters
    expected = keras_value(0.01, "columns", keras_kernel.reshape(-1, 10))
    assert math.isclose(float(reg(conv.weight.detach(), layout="torch")), expected, rel_tol=1e-5)
    assert math.isclose(float(reg(keras_kernel)), expected, rel_tol=1e-5)
    # finereg's own rows = output units: mode="rows" there is Keras's mode="columns" on a Keras kernel
    assert math.isclose(Orthogonality(WeightGroup(conv), factor=0.01, mode="rows")().item(), expected, rel_tol=1e-5)
    # and Keras's rows mode (input-side vectors; row order differs, the value does not)
    assert math.isclose(
        float(OrthogonalRegularizer(0.01, "rows")(conv.weight.detach(), layout="torch")),
        keras_value(0.01, "rows", keras_kernel.reshape(-1, 10)),
        rel_tol=1e-5,
    )


def test_gradient_equals_keras_torch_backend():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    ours = OrthogonalRegularizer(0.3, "rows")(x)
    (g_ours,) = torch.autograd.grad(ours, x)
    xk = x.detach().clone().requires_grad_(True)
    theirs = keras.regularizers.OrthogonalRegularizer(0.3, "rows")(xk)  # torch ops underneath
    (g_keras,) = torch.autograd.grad(theirs, xk)
    torch.testing.assert_close(g_ours, g_keras.to(g_ours.dtype), rtol=1e-6, atol=1e-8)


def test_single_row_is_zero_where_keras_gives_nan():
    x = torch.randn(1, 5)
    assert math.isnan(keras_value(0.01, "rows", x))  # Keras: 0 / 0
    assert float(OrthogonalRegularizer(0.01, "rows")(x)) == 0.0


def test_config_round_trip_like_keras():
    for args in [dict(), dict(factor=0.5, mode="columns"), dict(factor=2)]:
        ours = OrthogonalRegularizer(**args)
        theirs = keras.regularizers.OrthogonalRegularizer(**args).get_config()
        assert ours.get_config().keys() == theirs.keys() and ours.get_config()["mode"] == theirs["mode"]
        # Keras stores the factor as a float32 tensor (0.01 -> 0.009999999776...); we keep the given float
        assert ours.get_config()["factor"] == float(args.get("factor", 0.01))
        assert math.isclose(ours.get_config()["factor"], theirs["factor"], rel_tol=1e-7)
        again = OrthogonalRegularizer.from_config(ours.get_config())
        assert again.get_config() == ours.get_config()


def test_errors():
    with pytest.raises(ValueError, match="non-negative float"):
        OrthogonalRegularizer(-1)
    with pytest.raises(ValueError, match="non-negative float"):
        OrthogonalRegularizer(float("nan"))
    with pytest.raises(ValueError, match="mode"):
        OrthogonalRegularizer(mode="filters")
    with pytest.raises(ValueError, match="rank >= 2"):
        OrthogonalRegularizer()(torch.randn(5))
    with pytest.raises(ValueError, match="layout"):
        OrthogonalRegularizer()(torch.randn(5, 2), layout="nhwc")
    with pytest.raises(TypeError, match="floating-point"):
        OrthogonalRegularizer()(torch.ones(3, 3, dtype=torch.long))
