"""Seed 002 in Keras 3: one orthogonality penalty over the filters of two layers, filters 1, 4, 7 of the 1×1 conv
1024 → 10 frozen, trained with model.fit.

The seed's user split the 1×1 conv into ten one-filter layers (Keras freezes whole layers only) and wrapped
them in a layer calling add_loss. Here the layer stays whole: ``finereg.keras.freeze`` fixes the chosen
filters exactly (a constraint restores them after every optimizer step, so AdamW's weight decay cannot move
them), and ``Orthogonality(WeightGroup([head, aux]))`` sees all 10 + 6 filters as one 16 × 1024 matrix, in
the model's losses once. Works on every Keras backend (KERAS_BACKEND=torch | jax | tensorflow).

Run:  python examples/keras_orthogonal_freeze.py [--freeze 1,4,7] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

import finereg.keras as fk  # noqa: E402


def build(width: int = 1024) -> keras.Model:
    inp = keras.Input((7, 7, 32))
    feats = layers.Conv2D(width, 1, activation="relu", name="backbone")(inp)  # the (7, 7, 1024) features
    head = layers.Conv2D(10, 1, use_bias=False, name="head")(feats)  # the seed's 1×1 conv 1024 → 10
    aux = layers.Conv2D(6, 1, use_bias=False, name="aux")(feats)  # another layer on the same features
    return keras.Model(inp, layers.Concatenate()([head, aux]))


class Batches(keras.utils.PyDataset):
    """Data made on the fly: random inputs, targets from a fixed random 'teacher' network."""

    def __init__(self, steps: int, batch: int, seed: int):
        super().__init__()
        self.steps, self.batch, self.rng = steps, batch, np.random.default_rng(seed)
        self.w1 = self.rng.normal(size=(32, 64)).astype("float32") / np.sqrt(32)
        self.w2 = self.rng.normal(size=(64, 16)).astype("float32") / 8

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        x = self.rng.normal(size=(self.batch, 7, 7, 32)).astype("float32")
        return x, np.maximum(x @ self.w1, 0) @ self.w2


class Proof(keras.callbacks.Callback):
    """After each epoch: the penalty, and how far the frozen and the trainable filters have moved."""

    def __init__(self, head, penalty, frozen, start, steps):
        super().__init__()
        self.head, self.penalty, self.frozen, self.start, self.steps = head, penalty, frozen, start, steps
        self.values = [float(ops.convert_to_numpy(penalty()))]

    def on_epoch_end(self, epoch, logs=None):
        k = ops.convert_to_numpy(self.head.kernel)
        trainable = [i for i in range(10) if i not in self.frozen]
        self.values.append(float(ops.convert_to_numpy(self.penalty())))
        print(
            f"step {(epoch + 1) * self.steps:3d}  loss {logs['loss']:.5f}  penalty {self.values[-1]:.6f}  "
            f"max|Δ frozen| {np.abs(k[..., self.frozen] - self.start[..., self.frozen]).max():.1e}  "
            f"max|Δ trainable| {np.abs(k[..., trainable] - self.start[..., trainable]).max():.1e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--freeze", default="1,4,7", help="comma-separated filter indices of the 1×1 conv")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="batches per epoch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    keras.utils.set_random_seed(args.seed)
    frozen = [int(i) for i in args.freeze.split(",")]

    model = build()
    head, aux = model.get_layer("head"), model.get_layer("aux")
    group = fk.WeightGroup([head, aux])  # 16 filters × fan-in 1024, one matrix
    penalty = fk.Orthogonality(group, factor=1.0).attach()  # in model.losses once
    side_by_side = ops.concatenate([ops.reshape(head.kernel, (-1, 10)), ops.reshape(aux.kernel, (-1, 6))], axis=1)
    keras_value = keras.regularizers.OrthogonalRegularizer(1.0, mode="columns")(side_by_side)
    print(f"backend {keras.backend.backend()}; group {group.names} -> matrix {group.shape}")
    print(
        f"orthogonality penalty {float(ops.convert_to_numpy(penalty())):.6f} (Keras OrthogonalRegularizer on the "
        f"kernels side by side: {float(ops.convert_to_numpy(keras_value)):.6f})"
    )

    fk.freeze(head, "kernel", frozen)  # chosen at run time
    start = ops.convert_to_numpy(head.kernel).copy()
    print(f"frozen filters {frozen}: {int(fk.frozen_mask(head).sum())} of {head.kernel.shape} weights")
    model.compile(keras.optimizers.AdamW(3e-3, weight_decay=0.1), "mse")
    proof = Proof(head, penalty, frozen, start, args.steps)
    data = Batches(args.steps, args.batch, args.seed)
    model.fit(data, epochs=args.epochs, callbacks=[proof], verbose=0)
    kernel = ops.convert_to_numpy(head.kernel)
    unchanged = np.array_equal(kernel[..., frozen], start[..., frozen])
    print(f"frozen filters unchanged (bit-identical): {unchanged}")
    print(f"penalty decreasing: {proof.values[-1] < proof.values[0]} ({proof.values[0]:.6f} -> {proof.values[-1]:.6f})")

    # change the frozen set between fit calls: also freeze filter 0 (model= recompiles a compiled step)
    fk.freeze(head, "kernel", [0], model=model)
    before = ops.convert_to_numpy(head.kernel).copy()
    model.fit(data, epochs=1, verbose=0)
    after = ops.convert_to_numpy(head.kernel)
    print(
        f"after freezing filter 0 too: filters 0, {args.freeze} unchanged: "
        f"{np.array_equal(after[..., [0, *frozen]], before[..., [0, *frozen]])}"
    )

    path = os.path.join(tempfile.mkdtemp(), "seed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    same = np.isclose(
        sum(float(ops.convert_to_numpy(v)) for v in loaded.losses), float(ops.convert_to_numpy(penalty()))
    )
    print(
        f"saved and loaded ({os.path.basename(path)}): frozen mask kept "
        f"{np.array_equal(fk.frozen_mask(loaded.get_layer('head')), fk.frozen_mask(head))}, penalty kept {same}"
    )
    assert unchanged, "frozen filters moved"


if __name__ == "__main__":
    main()
