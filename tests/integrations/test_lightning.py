"""finereg in PyTorch Lightning on real MiniLM: the plain loop's weights, accumulation, fused L2-SP, resume."""

import copy

import pytest
import torch

import finereg
from finereg._checks import FineregError
from finereg.integrations import DeltaTerm, L2SPTerm, WrapOptimizer
from tests.integrations._setup import (
    COEF,
    LAYERS,
    TinyClassifier,
    assert_same_weights,
    lightning_module,
    make_terms,
    pl_run,
    pl_trainer,
    plain_run,
    tiny_data,
)

pytest.importorskip("lightning")
from finereg.integrations.lightning import FineregCallback  # noqa: E402


def test_lightning_equals_plain_loop_and_logs_every_term(base, data16, plain_reference):
    model, trainer, _ = pl_run(base, data16, make_terms(("l2sp", "delta", "bss", "kd")), steps=3)
    assert_same_weights(model, plain_reference)
    logged = trainer.logged_metrics
    for k in ("l2sp", "delta", "bss", "kd"):
        assert float(logged[f"finereg/{k}_step"]) > 0, k


def test_lightning_accumulation_4x4_equals_batch_16(base, data16):
    one, t1, _ = pl_run(base, data16, make_terms(("l2sp", "delta", "kd")), steps=2)
    acc, t4, _ = pl_run(base, data16, make_terms(("l2sp", "delta", "kd")), steps=2, batch=4, accumulate_grad_batches=4)
    assert_same_weights(one, acc, rtol=1e-6, atol=1e-6)
    # the per-micro-batch DELTA term is scaled by the 4 steps: its epoch mean is the batch-16 value
    assert float(t4.logged_metrics["finereg/delta_epoch"]) == pytest.approx(
        float(t1.logged_metrics["finereg/delta_epoch"]), rel=1e-4
    )


def test_fused_l2sp_equals_the_loss_term(base, data16):
    """mode="fused" adds α(w − w0) into .grad in on_before_optimizer_step: the loss term's gradient, one pass."""
    model, trainer, cb = pl_run(base, data16, [L2SPTerm(COEF["l2sp"], mode="fused")], steps=2, log_every_n_steps=1)
    assert_same_weights(model, plain_run(base, data16, ("l2sp",), steps=2))
    assert float(trainer.logged_metrics["finereg/l2sp"]) == pytest.approx(
        float(cb.reg.terms[0].penalty.value()), rel=1e-6
    )


def test_resume_from_a_lightning_checkpoint(base, data16, tmp_path):
    """Decoupled L2-SP + SPD (optimizer state) and DELTA (the source copy, callback state) resume from Lightning's
    checkpoint to the weights of the uninterrupted run, on a module built from other weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(model, steps, folder, ckpt_path=None):
        cb = FineregCallback(
            [
                L2SPTerm(1.0, mode="decoupled"),
                DeltaTerm(LAYERS, COEF["delta"]),
                WrapOptimizer(finereg.SPD, weight_decay=0.5),
            ],
            module="model",
        )
        saver = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=2, save_top_k=-1, save_last=False)
        trainer = pl_trainer(steps, [cb, saver], enable_checkpointing=True)
        loader = torch.utils.data.DataLoader(data16, batch_size=16, shuffle=False)
        trainer.fit(lightning_module(model), loader, ckpt_path=ckpt_path)
        return trainer

    full = copy.deepcopy(base)
    trainer = run(full, 3, "full")
    assert isinstance(trainer.optimizers[0], finereg.SPD)
    ckpt = next((tmp_path / "full").glob("*step=2.ckpt"))
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run(other, 3, "resumed", ckpt_path=str(ckpt))
    assert_same_weights(other, full)


def test_regularize_the_lightning_module_itself_and_errors():
    """module=None regularizes the LightningModule (its copy leaves the trainer out); misuse is refused."""
    torch.manual_seed(0)
    data = tiny_data()
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    cb = FineregCallback([DeltaTerm("model.layer", 0.1), L2SPTerm(0.1)])
    module = lightning_module(TinyClassifier())
    pl_trainer(2, [cb]).fit(module, loader)
    assert cb.reg.source is not None and cb.reg.source is not module
    assert getattr(cb.reg.source, "_trainer", None) is None
    assert cb.reg.terms[1].penalty.anchored_names[0].startswith("model.")

    with pytest.raises(FineregError, match="exactly one FineregCallback"):
        pl_trainer(1, []).fit(lightning_module(TinyClassifier()), loader)
    with pytest.raises(FineregError, match="before fitting"):
        FineregCallback([L2SPTerm()]).loss(module, {}, None)


def test_lightning_bf16_is_the_plain_loop_under_autocast(base, data16, plain_bf16):
    """precision="bf16-mixed": Lightning's autocast covers training_step, so the model and the frozen source model;
    the terms are computed in float32. Same weights as a plain loop under torch.autocast(bfloat16)."""
    model, _, _ = pl_run(base, data16, make_terms(("l2sp", "delta", "bss", "kd")), steps=2, precision="bf16-mixed")
    assert_same_weights(model, plain_bf16)
