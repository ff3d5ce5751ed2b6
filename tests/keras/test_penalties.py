"""finereg.keras group penalties: Keras's golden values, Keras itself, finereg's torch penalties, the losses."""

import keras
import numpy as np
import pytest
import torch
from keras import ops

import finereg
import finereg.keras as fk
from finereg._checks import FineregError, UnknownNameError

from ._helpers import BACKEND, to_np, torch_module, torch_only, torch_penalty


def built(layer, shape):
    layer.build(shape)
    return layer


def zoo():
    """Layers of every layout with fan-in 36 (Dense, Conv2D, Conv1D, Conv2DTranspose), plus a depthwise conv."""
    return {
        "dense": built(keras.layers.Dense(5), (None, 36)),
        "conv2d": built(keras.layers.Conv2D(6, 3), (None, 8, 8, 4)),
        "conv1d": built(keras.layers.Conv1D(7, 4), (None, 10, 9)),
        "transpose": built(keras.layers.Conv2DTranspose(3, 3), (None, 8, 8, 4)),
        "depthwise": built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 8, 8, 4)),
    }


def value(x) -> float:
    return float(to_np(x))


def test_golden(keras_golden):
    """Keras's numbers; Keras's mode names a side of the kernel (fan-in, units): its "columns" are our rows."""
    ours = {"columns": "rows", "rows": "columns"}
    for c in keras_golden["orthogonal"]:
        matrix = c["matrix"].numpy().astype("float32")
        got = fk.Orthogonality(factor=c["factor"], mode=ours[c["mode"]])(matrix)
        np.testing.assert_allclose(value(got), float(c["value"]), rtol=1e-5)


def test_seed_statement_two_convs_equal_keras_columns():
    """The issue's promise: Orthogonality(WeightGroup([a, b]), factor=f)() is Keras's OrthogonalRegularizer(f,
    mode="columns") on the kernels reshaped to (fan-in, filters) and put side by side."""
    a = built(keras.layers.Conv2D(10, 1), (None, 7, 7, 1024))
    b = built(keras.layers.Conv2D(4, 2), (None, 7, 7, 256))  # fan-in 2·2·256 = 1024
    side_by_side = ops.concatenate([ops.reshape(a.kernel, (-1, 10)), ops.reshape(b.kernel, (-1, 4))], axis=1)
    keras_value = keras.regularizers.OrthogonalRegularizer(0.05, mode="columns")(side_by_side)
    group = fk.WeightGroup([a, b])
    assert group.shape == (14, 1024)
    np.testing.assert_allclose(value(fk.Orthogonality(group, factor=0.05)()), value(keras_value), rtol=1e-6)


CASES = [
    ("Orthogonality", {}, {}),
    ("Orthogonality", {"mode": "columns"}, {"mode": "columns"}),
    ("SoftOrthogonality", {}, {}),
    ("DoubleSoftOrthogonality", {}, {}),
    ("MutualCoherence", {}, {}),
    ("MutualCoherence", {"mode": "columns"}, {"mode": "columns"}),
    ("SRIP", {}, {"n_power_iterations": 300}),
    ("SRIP", {"squared": True}, {"n_power_iterations": 300, "squared": True}),
]


@pytest.mark.parametrize("name, kw, torch_kw", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
@pytest.mark.parametrize("axis", [0, None])
def test_equals_torch_penalties(name, kw, torch_kw, axis):
    """Same weights in both layouts (Keras (…, in, out), torch (out, in, …)): the same value."""
    layers = zoo()
    if axis == 0:
        layers.pop("depthwise")  # fan-in 9: joined along rows only with fan-in 9 members
    group = fk.WeightGroup(list(layers.values()), axis=axis, order="torch")
    ours = value(getattr(fk, name)(group, factor=0.3, **kw)())
    reference = finereg.WeightGroup([torch_module(lay) for lay in layers.values()], axis=axis)
    theirs = torch_penalty(name, reference, 0.3, **torch_kw)().item()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4 if name == "SRIP" else 2e-5)
    if axis is None:  # each member on its own: the fan-in order is a permutation, no value changes
        keras_order = value(getattr(fk, name)(fk.WeightGroup(list(layers.values()), axis=None), factor=0.3, **kw)())
        np.testing.assert_allclose(keras_order, ours, rtol=1e-5)


def test_axis_1_and_tall_and_wide_matrices_equal_torch():
    layers = [built(keras.layers.Dense(6), (None, 40)), built(keras.layers.Conv2D(6, 2), (None, 5, 5, 3))]
    group = fk.WeightGroup(layers, axis=1, order="torch")
    assert group.shape == (6, 52)
    reference = finereg.WeightGroup([torch_module(lay) for lay in layers], axis=1)
    for name in ("SoftOrthogonality", "DoubleSoftOrthogonality", "Orthogonality"):
        np.testing.assert_allclose(
            value(getattr(fk, name)(group, factor=1.0)()), torch_penalty(name, reference, 1.0)().item(), rtol=2e-5
        )
    tall = built(keras.layers.Dense(50), (None, 8))  # 50 units × fan-in 8: the Gram on the smaller side
    np.testing.assert_allclose(
        value(fk.DoubleSoftOrthogonality(fk.WeightGroup(tall), factor=1.0)()),
        torch_penalty("DoubleSoftOrthogonality", finereg.WeightGroup(torch_module(tall)), 1.0)().item(),
        rtol=2e-5,
    )


def test_callable_penalty_equals_torch():
    layers = zoo()
    layers.pop("depthwise")
    group = fk.WeightGroup(list(layers.values()), order="torch")  # the callable sees torch's matrix
    ours = fk.CallablePenalty(lambda w: ops.sum(ops.square(ops.matmul(w, ops.transpose(w)))), group, factor=0.5)
    reference = finereg.WeightGroup([torch_module(lay) for lay in layers.values()])
    theirs = finereg.CallablePenalty(lambda w: (w @ w.T).square().sum(), reference, factor=0.5)
    np.testing.assert_allclose(value(ours()), theirs().item(), rtol=2e-5)
    assert group.matrix().shape == (21, 36)


@torch_only
@pytest.mark.parametrize("name", ["Orthogonality", "SoftOrthogonality", "DoubleSoftOrthogonality"])
def test_gradients_equal_torch(name):
    layers = zoo()
    layers.pop("depthwise")
    layers = list(layers.values())
    loss = getattr(fk, name)(fk.WeightGroup(layers, order="torch"), factor=0.7)()
    grads = torch.autograd.grad(loss, [lay.kernel.value for lay in layers])
    mods = [torch_module(lay) for lay in layers]
    torch_penalty(name, finereg.WeightGroup(mods), 0.7)().backward()
    for g, m in zip(grads, mods):
        keras_layout = torch.from_numpy(to_np(g).astype(np.float64))
        nd = keras_layout.dim() - 2
        np.testing.assert_allclose(
            keras_layout.permute(nd + 1, nd, *range(nd)).numpy(),
            m.weight.grad.numpy(),
            rtol=1e-4,
            atol=1e-5 * m.weight.grad.abs().max().item(),  # float32 against float64
        )


def seed_model():
    inp = keras.Input((7, 7, 16))
    h = keras.layers.Conv2D(8, 3, padding="same", name="backbone", kernel_regularizer=keras.regularizers.L2(0.1))(inp)
    out = keras.layers.Conv2D(10, 1, use_bias=False, name="head")(h)
    return keras.Model(inp, out)


def test_attached_penalty_is_in_the_losses_once():
    model = seed_model()
    l2 = value(keras.regularizers.L2(0.1)(model.get_layer("backbone").kernel))
    assert np.isclose(sum(value(x) for x in model.losses), l2)
    penalty = fk.SoftOrthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=0.01).attach()
    losses = [value(x) for x in model.losses]
    assert len([x for x in losses if x != 0]) == 2  # backbone's own L2, and the group penalty once
    np.testing.assert_allclose(sum(losses), value(penalty()) + l2, rtol=1e-6)
    penalty.detach()
    assert np.isclose(sum(value(x) for x in model.losses), l2)
    assert model.get_layer("head").kernel_regularizer is None


def test_penalty_alone_trains_the_weights_down():
    """The gradient reaches the members through Keras's training step (on JAX: the stateless, jitted one)."""
    model = seed_model()
    penalty = fk.SoftOrthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=0.05).attach()
    before = value(penalty())
    model.compile(keras.optimizers.SGD(0.05), loss=lambda y, p: ops.mean(p) * 0.0)
    x = np.zeros((4, 7, 7, 16), "float32")
    model.fit(x, np.zeros((4, 7, 7, 10), "float32"), epochs=3, batch_size=4, verbose=0)
    assert value(penalty()) < 0.9 * before


def test_save_load_round_trip(tmp_path):
    model = seed_model()
    fk.Orthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=0.1).attach()
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 16)).astype("float32")
    expected = [value(v) for v in model.losses]
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose([value(v) for v in loaded.losses], expected, rtol=1e-6)
    np.testing.assert_allclose(to_np(loaded(x)), to_np(model(x)), rtol=1e-6)
    share_head = loaded.get_layer("head").kernel.regularizer
    share_backbone = loaded.get_layer("backbone").kernel.regularizer
    assert share_head.penalty is share_backbone.penalty  # one penalty, shared by its members' shares
    assert isinstance(share_backbone.regularizer, keras.regularizers.L2)  # the layer's own one kept
    penalty = share_head.penalty.bind(loaded)
    np.testing.assert_allclose(
        value(penalty()),
        expected[0] + expected[1] - 0.1 * value(ops.sum(ops.square(loaded.get_layer("backbone").kernel))),
        rtol=1e-5,
    )


def test_member_that_is_not_trainable(tmp_path):
    model = seed_model()
    model.get_layer("backbone").trainable = False
    penalty = fk.Orthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=0.1).attach()
    np.testing.assert_allclose(sum(value(v) for v in model.losses), value(penalty()), rtol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    with pytest.raises(FineregError, match="finereg.keras.bind"):
        _ = loaded.losses
    (again,) = fk.bind(loaded)
    np.testing.assert_allclose(sum(value(v) for v in loaded.losses), value(again()), rtol=1e-6)
    np.testing.assert_allclose(value(again()), value(penalty()), rtol=1e-6)


def test_clone_model_then_bind():
    model = seed_model()
    penalty = fk.Orthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=0.1).attach()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    (bound,) = fk.bind(clone)
    assert bound is not penalty and bound.group.variables[0] is clone.get_layer("head").kernel
    np.testing.assert_allclose(value(bound()), value(penalty()), rtol=1e-6)
    assert clone.get_layer("head").kernel.regularizer.penalty is clone.get_layer("backbone").kernel.regularizer.penalty


def test_groups_by_pattern_and_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="fc1"), keras.layers.Dense(4, name="fc2")])
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(inner(inp)))
    group = fk.WeightGroup("*/fc*", model)
    assert group.names == [f"{inner.name}/fc1", f"{inner.name}/fc2"] and group.shape == (8, 4)
    assert fk.WeightGroup("fc2", model).names == [f"{inner.name}/fc2"]
    with pytest.raises(UnknownNameError, match="fc1"):
        fk.WeightGroup("fc3", model)


def test_errors():
    a, b = built(keras.layers.Dense(3), (None, 4)), built(keras.layers.Dense(3), (None, 5))
    with pytest.raises(FineregError, match="different fan-ins"):
        fk.WeightGroup([a, b])
    with pytest.raises(FineregError, match="axis must be one of"):
        fk.WeightGroup(a, axis=2)
    with pytest.raises(FineregError, match="factor must be"):
        fk.Orthogonality(fk.WeightGroup(a), factor=-1)
    with pytest.raises(FineregError, match="mode must be"):
        fk.Orthogonality(mode="filters")
    with pytest.raises(FineregError, match="pass model="):
        fk.WeightGroup("dense")
    with pytest.raises(UnknownNameError, match="bias"):
        fk.WeightGroup(a, param="weight")
    with pytest.raises(FineregError, match="has no group"):
        fk.SRIP()()
    with pytest.raises(FineregError, match="not built"):
        fk.WeightGroup(keras.layers.Dense(3))
    assert value(fk.Orthogonality(factor=1.0)(np.ones((5, 1), "float32"))) == 0.0  # one unit: no pairs (Keras: NaN)


def test_configs_round_trip():
    group = fk.WeightGroup(list(zoo().values()), axis=None)
    for p in (fk.Orthogonality(group, 0.2, mode="columns"), fk.SRIP(group, 0.1, squared=True), fk.MutualCoherence()):
        again = type(p).from_config(p.get_config())
        assert again.get_config() == p.get_config()
    assert BACKEND in ("torch", "jax", "tensorflow")
