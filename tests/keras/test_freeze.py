"""finereg.keras.freeze: frozen entries bit-identical after model.fit under SGD/Nesterov, Adam, AdamW, RMSprop;
the others train as in the seed's ten-layer workaround; the penalty still sees every filter; .keras files."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import finereg.keras as fk
from finereg._checks import FineregError

from ._helpers import BACKEND, to_np

FROZEN = [1, 4, 7]
TRAINABLE = [0, 2, 3, 5, 6, 8, 9]

OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.5),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
}


def seed_model(filters=10):
    """Seed 002, small: a backbone conv, then the 1×1 conv → 10 filters."""
    inp = keras.Input((4, 4, 8))
    h = keras.layers.Conv2D(12, 3, padding="same", name="backbone")(inp)
    return keras.Model(inp, keras.layers.Conv2D(filters, 1, use_bias=False, name="head")(h))


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4, 4, 8)).astype("float32"), rng.normal(size=(n, 4, 4, 10)).astype("float32")


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_frozen_filters_bit_identical_after_fit(opt):
    model = seed_model()
    head = model.get_layer("head")
    penalty = fk.Orthogonality(fk.WeightGroup(["head", "backbone"], model, axis=None), factor=1.0).attach()
    fk.freeze(head, "kernel", FROZEN)
    start = to_np(head.kernel)
    model.compile(OPTIMIZERS[opt](), "mse")
    x, y = data()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    end = to_np(head.kernel)
    assert np.array_equal(end[..., FROZEN], start[..., FROZEN])  # bit-identical
    assert np.abs(end[..., TRAINABLE] - start[..., TRAINABLE]).min() > 0  # every other weight moved
    assert to_np(penalty()) > 0


def test_trainable_filters_train_as_the_seeds_split_model():
    """The seed's workaround — 10 one-filter layers, 3 of them trainable=False, one penalty over all — and one
    layer with filters 1, 4, 7 frozen train to the same weights (the penalty sees the frozen filters in both)."""
    x, y = data()
    xin = keras.Input((4, 4, 8))
    whole = keras.Model(xin, keras.layers.Conv2D(10, 1, use_bias=False, name="head")(xin))
    kernel = to_np(whole.get_layer("head").kernel)
    parts = [keras.layers.Conv2D(1, 1, use_bias=False, name=f"f{i}") for i in range(10)]
    split = keras.Model(xin, keras.layers.Concatenate()([p(xin) for p in parts]))
    for i, p in enumerate(parts):
        p.kernel.assign(kernel[..., i : i + 1])
        p.trainable = i not in FROZEN
    fk.SoftOrthogonality(fk.WeightGroup(parts), factor=0.1).attach()
    fk.SoftOrthogonality(fk.WeightGroup(whole.get_layer("head")), factor=0.1).attach()
    fk.freeze(whole.get_layer("head"), "kernel", FROZEN)
    for m in (whole, split):
        m.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
        m.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    got = to_np(whole.get_layer("head").kernel)
    want = np.concatenate([to_np(p.kernel) for p in parts], axis=-1)
    np.testing.assert_array_equal(got[..., FROZEN], kernel[..., FROZEN])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.abs(got - kernel).max() > 1e-3


def test_frozen_set_changes_between_fits_and_penalty_sees_all_filters():
    model = seed_model()
    head = model.get_layer("head")
    penalty = fk.SoftOrthogonality(fk.WeightGroup(head), factor=1.0).attach()
    fk.freeze(head, "kernel", [1])
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.1), loss=lambda t, p: ops.mean(p) * 0.0)
    x, y = data(8)
    k0 = to_np(head.kernel)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    k1 = to_np(head.kernel)
    assert np.array_equal(k1[..., 1], k0[..., 1]) and not np.array_equal(k1[..., 4], k0[..., 4])
    fk.freeze(head, "kernel", [4, 7], model=model)  # adds to the frozen set
    assert np.array_equal(np.flatnonzero(fk.frozen_mask(head)[0, 0, 0]), [1, 4, 7])
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    k2 = to_np(head.kernel)
    assert np.array_equal(k2[..., [4, 7]], k1[..., [4, 7]]) and np.array_equal(k2[..., 1], k0[..., 1])

    # the penalty's gradient reaches the trainable filters through the frozen ones: pure SO pushes them apart
    def max_cos(k):  # the largest |cosine| between a trainable and a frozen filter
        u = k.reshape(-1, 10) / np.linalg.norm(k.reshape(-1, 10), axis=0)
        return np.abs(u[:, TRAINABLE].T @ u[:, FROZEN]).max()

    assert max_cos(k2) < max_cos(k1)
    assert float(to_np(penalty())) > 0
    fk.unfreeze(head, "kernel", model=model)
    assert fk.frozen_mask(head) is None
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not np.array_equal(to_np(head.kernel)[..., 1], k0[..., 1])


def test_bool_mask_and_save_load(tmp_path):
    model = seed_model()
    backbone = model.get_layer("backbone")
    mask = np.random.default_rng(1).random(tuple(backbone.kernel.shape)) < 0.3
    fk.freeze(backbone, "kernel", mask)
    fk.freeze(backbone, "bias", [0, 5])
    start_k, start_b = to_np(backbone.kernel), to_np(backbone.bias)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    lb = loaded.get_layer("backbone")
    assert np.array_equal(fk.frozen_mask(lb), mask)
    loaded.compile(keras.optimizers.Adam(0.05), "mse")
    x, y = data(8)
    loaded.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.array_equal(to_np(lb.kernel)[mask], start_k[mask])
    assert not np.array_equal(to_np(lb.kernel)[~mask], start_k[~mask])
    assert np.array_equal(to_np(lb.bias)[[0, 5]], start_b[[0, 5]])
    assert lb.kernel.constraint.get_config() == backbone.kernel.constraint.get_config()


def test_unit_indices_follow_the_keras_layout():
    t = keras.layers.Conv2DTranspose(5, 3)
    t.build((None, 6, 6, 2))  # kernel (3, 3, 5, 2): filters on axis -2
    fk.freeze(t, "kernel", [-1])
    m = fk.frozen_mask(t)
    assert m[:, :, 4, :].all() and not m[:, :, :4, :].any()
    d = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    d.build((None, 6, 6, 3))  # kernel (3, 3, 3, 2): output channel c·2 + k
    fk.freeze(d, "kernel", [3])
    m = fk.frozen_mask(d)
    assert m[:, :, 1, 1].all() and m.sum() == 9
    e = keras.layers.Embedding(7, 4)
    e.build((None,))
    fk.freeze(e, "embeddings", [2])
    assert fk.frozen_mask(e, "embeddings")[2].all() and fk.frozen_mask(e, "embeddings").sum() == 4


def test_keeps_the_previous_constraint():
    dense = keras.layers.Dense(4, kernel_constraint=keras.constraints.NonNeg())
    dense.build((None, 3))
    fk.freeze(dense, "kernel", [0])
    w = to_np(dense.kernel)
    out = to_np(dense.kernel.constraint(ops.convert_to_tensor(w - 10.0)))
    assert np.array_equal(out[:, 0], w[:, 0]) and (out[:, 1:] == 0).all()
    fk.unfreeze(dense)
    assert isinstance(dense.kernel.constraint, keras.constraints.NonNeg)
    assert isinstance(dense.kernel_constraint, keras.constraints.NonNeg)


def test_errors_and_compiled_step_warning():
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    with pytest.raises(FineregError, match="out of range"):
        fk.freeze(dense, "kernel", [4])
    with pytest.raises(FineregError, match="shape"):
        fk.freeze(dense, "kernel", np.zeros((4, 3), bool))
    with pytest.raises(FineregError, match="must be bool"):
        fk.freeze(dense, "kernel", np.zeros((3, 4)))
    with pytest.raises(FineregError, match="not frozen"):
        fk.unfreeze(dense, "kernel")
    with pytest.raises(KeyError, match="kernel"):
        fk.freeze(dense, "kernal", [0])
    inp = keras.Input((3,))
    model = keras.Model(inp, dense(inp))
    model.compile(keras.optimizers.Adam(use_ema=True), "mse")
    with pytest.raises(FineregError, match="use_ema"):  # averaged weights are written back unconstrained
        fk.freeze(dense, "kernel", [0], model=model)
    assert fk.frozen_mask(dense) is None  # refused before anything changed
    fk.freeze(dense, "kernel", [0])
    dense.kernel.constraint(dense.kernel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fk.freeze(dense, "kernel", [1])
    caught = [w for w in caught if "compiled the training step" in str(w.message)]
    assert bool(caught) == (BACKEND != "torch")  # a compiled step keeps the old set: say how to refresh it
