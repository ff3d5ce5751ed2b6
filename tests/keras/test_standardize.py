"""finereg.keras weight standardization: the layers equal finereg's torch standardize on the same weights;
standardize(model) keeps the weights, bake(model) keeps the outputs; .keras files."""

import re

import keras
import numpy as np
import pytest
import torch
from keras import ops

import finereg
import finereg.keras as fk
from finereg._checks import FineregError, FineregWarning, UnknownNameError

from ._helpers import to_np

LAYERS = {
    "Conv1D": (lambda v: fk.StandardizedConv1D(5, 3, variant=v), (2, 9, 4), torch.nn.Conv1d),
    "Conv2D": (lambda v: fk.StandardizedConv2D(5, 3, variant=v), (2, 6, 6, 4), torch.nn.Conv2d),
    "Conv3D": (lambda v: fk.StandardizedConv3D(3, 2, variant=v), (2, 4, 4, 4, 3), torch.nn.Conv3d),
    "Dense": (lambda v: fk.StandardizedDense(5, variant=v), (2, 7), torch.nn.Linear),
}
VARIANTS = ["ws", "bit", "scaled"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layers_equal_torch_standardize(kind, variant):
    make, in_shape, torch_cls = LAYERS[kind]
    layer = make(variant)
    x = np.random.default_rng(0).normal(size=in_shape).astype("float32")
    y = to_np(layer(x))
    raw = to_np(layer._kernel)
    nd = raw.ndim - 2
    w = np.transpose(raw, (nd + 1, nd, *range(nd))) if nd >= 0 and raw.ndim > 2 else raw.T
    if torch_cls is torch.nn.Linear:
        mod = torch.nn.Linear(w.shape[1], w.shape[0])
    else:
        mod = torch_cls(w.shape[1], w.shape[0], tuple(w.shape[2:]))
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        mod.bias.copy_(torch.from_numpy(to_np(layer.bias)))
    finereg.standardize(mod, variant, linear=torch_cls is torch.nn.Linear)
    if variant == "scaled":
        gain = np.linspace(0.5, 1.5, w.shape[0]).astype("float32")
        layer.gain.assign(gain)
        y = to_np(layer(x))
        with torch.no_grad():
            mod.parametrizations.weight[0].gain.copy_(torch.from_numpy(gain))
    want_kernel = mod.weight.detach().numpy()
    got_kernel = to_np(layer.kernel)
    got_kernel = np.transpose(got_kernel, (nd + 1, nd, *range(nd))) if raw.ndim > 2 else got_kernel.T
    np.testing.assert_allclose(got_kernel, want_kernel, rtol=1e-5, atol=1e-6)
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()) if raw.ndim > 2 else torch.from_numpy(x)
    want = mod(xt).detach().numpy()
    want = np.moveaxis(want, 1, -1) if raw.ndim > 2 else want
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def functional():
    inner = keras.Sequential(
        [keras.Input((8, 8, 6)), keras.layers.Conv2D(6, 3, padding="same", name="c1"), keras.layers.ReLU()],
        name="backbone",
    )
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inp)
    h = inner(h)
    h = keras.layers.Conv2D(4, 1, name="one_by_one")(h)
    h = keras.layers.Conv2D(2, 1, name="tiny")(keras.layers.Conv2D(1, 1, name="fan1")(h))  # fan-in 1: left alone
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(h))


def test_standardize_model_keeps_weights_then_bake_keeps_outputs(tmp_path):
    model = functional()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    new = fk.standardize(model, "bit", exclude="stem")
    kinds = {p: type(lay).__name__ for p, lay in fk._layout.named_layers(new)}
    assert kinds["stem"] == "Conv2D" and kinds["backbone/c1"] == "StandardizedConv2D"
    assert kinds["one_by_one"] == "StandardizedConv2D" and kinds["fc"] == "Dense"
    assert kinds["fan1"] == "StandardizedConv2D" and kinds["tiny"] == "Conv2D"  # fan-in 4, and 1 (left alone)
    c1_old, c1_new = model.get_layer("backbone").get_layer("c1"), new.get_layer("backbone").get_layer("c1")
    assert np.array_equal(to_np(c1_new._kernel), to_np(c1_old.kernel))
    np.testing.assert_allclose(to_np(c1_new.kernel), to_np(fk.standardize_kernel(c1_old.kernel, "bit")), rtol=1e-6)
    assert not np.allclose(to_np(new(x)), to_np(model(x)))
    baked = fk.bake(new)
    assert all(not isinstance(lay, fk.StandardizedConv2D) for _, lay in fk._layout.named_layers(baked))
    np.testing.assert_allclose(to_np(baked(x)), to_np(new(x)), rtol=1e-5, atol=1e-6)
    new.save(tmp_path / "ws.keras")
    loaded = keras.models.load_model(tmp_path / "ws.keras")
    np.testing.assert_allclose(to_np(loaded(x)), to_np(new(x)), rtol=1e-6, atol=1e-7)
    for a, b in zip(loaded.weights, new.weights):  # the trained kernels, not Ŵ
        assert np.array_equal(to_np(a), to_np(b))
    with_dense = fk.standardize(model, "scaled", include=["fc", "one_by_one"], dense=True, gain_init=2.0)
    assert type(with_dense.get_layer("fc")).__name__ == "StandardizedDense"
    assert np.array_equal(to_np(with_dense.get_layer("fc").gain), np.full(3, 2.0, "float32"))
    with_dense.get_layer("fc").gain.assign(np.arange(3, dtype="float32"))
    with_dense.save(tmp_path / "scaled.keras")
    again = keras.models.load_model(tmp_path / "scaled.keras")
    assert np.array_equal(to_np(again.get_layer("fc").gain), np.arange(3, dtype="float32"))
    np.testing.assert_allclose(to_np(again(x)), to_np(with_dense(x)), rtol=1e-6, atol=1e-7)


def test_standardize_carries_penalties_and_frozen_entries():
    model = functional()
    fk.Orthogonality(fk.WeightGroup(["one_by_one", "backbone/c1"], model, axis=None), factor=0.1).attach()
    fk.freeze(model.get_layer("one_by_one"), "kernel", [0, 2])
    new = fk.standardize(model, "ws")
    penalty = new.get_layer("one_by_one")._kernel.regularizer.penalty  # kernel is Ŵ, _kernel the variable
    assert penalty.group.variables[0] is new.get_layer("one_by_one")._kernel
    np.testing.assert_allclose(sum(float(to_np(v)) for v in new.losses), float(to_np(penalty())), rtol=1e-6)
    assert fk.frozen_mask(new.get_layer("one_by_one"))[..., [0, 2]].all()


def test_training_a_standardized_layer_with_frozen_filters():
    inp = keras.Input((6, 6, 4))
    conv = fk.StandardizedConv2D(5, 3, variant="ws", name="ws")
    model = keras.Model(inp, conv(inp))
    fk.freeze(conv, "kernel", [3])
    start = to_np(conv.kernel)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 6, 6, 4)), rng.normal(size=(8, 4, 4, 5)), epochs=2, batch_size=4, verbose=0)
    end = to_np(conv.kernel)
    assert np.array_equal(end[..., 3], start[..., 3]) and not np.allclose(end[..., :3], start[..., :3])
    per_unit = end.reshape(-1, 5)
    np.testing.assert_allclose(per_unit.mean(0), 0, atol=1e-6)  # Ŵ is standardized per unit
    np.testing.assert_allclose(per_unit.std(0, ddof=1), 1, rtol=1e-3)


def test_errors():
    with pytest.raises(FineregError, match="variant must be one of"):
        fk.StandardizedConv2D(4, 3, variant="batch")
    with pytest.raises(UnknownNameError, match="stem"):
        fk.standardize(functional(), "ws", include="stemm")
    with pytest.raises(FineregError, match="fan-in of 1"):
        fk.StandardizedDense(3)(np.zeros((1, 1), "float32"))
    with pytest.raises(FineregError, match="Functional or Sequential"):
        fk.standardize(keras.layers.Dense(3), "ws")
    assert ops.shape(fk.standardize_kernel(np.ones((3, 3, 2, 4), "float32"), "bit")) == (3, 3, 2, 4)


class _Subclassed(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = keras.layers.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def test_models_standardize_cannot_rebuild_are_clear_errors():
    """Issue 17 item 18: an unbuilt or a subclassed model reached an AttributeError ('Conv2D' object has no
    attribute 'kernel'); a subclassed one nested in a Functional model too."""
    with pytest.raises(FineregError, match="'seq' is not built"):
        fk.standardize(keras.Sequential([keras.layers.Conv2D(4, 3)], name="seq"))
    sub = _Subclassed()
    sub(np.zeros((1, 6, 6, 2), "float32"))  # built, and still not a layer graph
    with pytest.raises(FineregError, match="subclassed model"):
        fk.standardize(sub)
    inp = keras.Input((6, 6, 2))
    outer = keras.Model(inp, keras.layers.Flatten()(_Subclassed(name="sub")(inp)))
    with pytest.raises(FineregError, match=r"'sub' is a subclassed model \(_Subclassed\)"):
        fk.standardize(outer)
    with pytest.raises(FineregError, match="bake needs a Functional or Sequential"):
        fk.bake(sub)


def test_eps_0_is_the_clear_error_and_nothing_to_standardize_warns():
    """Issue 17 item 22: eps=0 surfaced Keras's deserialization TypeError (the clear message only chained); a
    model with nothing to standardize gave no warning where torch's standardize warns."""
    with pytest.raises(FineregError, match="eps must be a finite number > 0, got 0") as e:
        fk.standardize(functional(), eps=0)
    assert type(e.value) is FineregError
    with pytest.raises(FineregError, match="gamma must be a finite number"):
        fk.standardize(functional(), gamma=float("nan"))
    dense_only = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.warns(FineregWarning, match=r"changed nothing: no convolution to standardize .*dense=True"):
        same = fk.standardize(dense_only)
    assert [type(lay).__name__ for lay in same.layers] == ["Dense"]
    with pytest.raises(FineregError, match="changed nothing"):
        fk.standardize(dense_only, strict=True)
    torch_msg = "weight standardization ('ws') changed nothing: no convolution to standardize"
    with pytest.warns(FineregWarning, match=re.escape(torch_msg)):  # the torch front's words
        finereg.standardize(torch.nn.Linear(3, 2))
