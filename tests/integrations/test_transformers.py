"""finereg in Hugging Face's Trainer on real MiniLM: the plain loop's weights, accumulation, logging, resume."""

import copy
import math
import os
import shutil

import pytest
import torch

import finereg
from finereg._checks import FineregError
from finereg.integrations import DeltaTerm, KDTerm, L2SPTerm, WrapOptimizer
from tests.integrations._setup import (
    COEF,
    LAYERS,
    TinyClassifier,
    assert_same_weights,
    hf_args,
    hf_run,
    make_terms,
    plain_run,
    tiny_data,
    train_data,
)

pytest.importorskip("accelerate")
from finereg.integrations.transformers import STATE_NAME, FineregTrainer  # noqa: E402

METHODS = ("l2sp", "delta", "bss", "kd")


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_equals_plain_loop_and_logs_every_term(base, data16, plain_reference, tmp_path):
    """L2-SP + DELTA (two transformer layers) + BSS (pooled embedding) + KD: FineregTrainer's weights are the plain
    loop's; each step's log holds the terms beside the loss, and loss = task_loss + Σ terms."""
    model, trainer = hf_run(base, data16, make_terms(METHODS), steps=3, out=str(tmp_path))
    assert_same_weights(model, plain_reference)
    logs = _train_logs(trainer)
    assert len(logs) == 3
    for h in logs:
        assert {"task_loss", "l2sp", "delta", "bss", "kd"} <= h.keys()
        assert h["loss"] == pytest.approx(h["task_loss"] + h["l2sp"] + h["delta"] + h["bss"] + h["kd"], rel=1e-5)
    # the first step starts at the pretrained weights: the pulls towards them are 0 there, then not
    assert logs[0]["l2sp"] == 0 and logs[0]["delta"] == 0 and logs[0]["kd"] == pytest.approx(0, abs=1e-7)
    assert all(h[k] > 0 for h in logs[1:] for k in ("l2sp", "delta", "bss", "kd"))
    assert trainer.evaluate(data16)["eval_loss"] == pytest.approx(_task_loss(model, data16), rel=1e-5)


def _task_loss(model, data):
    model.eval()
    with torch.no_grad():
        return float(model(**data.tensors).loss)


def test_accumulation_4x4_equals_batch_16(base, data16, tmp_path):
    """Gradient accumulation scales every term as the whole batch would: 4 micro-batches of 4 give the weights
    (and the logged terms) of one batch of 16, with L2-SP, DELTA (a sum over the batch), KD and SPD."""

    def terms():
        return [*make_terms(("l2sp", "delta", "kd")), WrapOptimizer(finereg.SPD, weight_decay=0.5)]

    one, t1 = hf_run(base, data16, terms(), steps=2, out=str(tmp_path / "b16"))
    acc, t4 = hf_run(
        base,
        data16,
        terms(),
        steps=2,
        out=str(tmp_path / "b4x4"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
    )
    assert_same_weights(one, acc, rtol=1e-6, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(one.state_dict().values(), base.state_dict().values())) > 1e-3
    for a, b in zip(_train_logs(t1), _train_logs(t4)):
        for k in ("loss", "task_loss", "l2sp", "delta", "kd"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_decoupled_l2sp_is_the_wrapper_in_the_optimizer(base, data16, tmp_path):
    """L2SPTerm(mode="decoupled") is finereg.DecoupledL2SP around the Trainer's optimizer: the weights of a plain
    loop with DecoupledL2SP(SGD) by hand; its logged value is L2-SP's penalty of the current weights."""
    alpha, beta = 2.0, 0.5
    model, trainer = hf_run(
        base, data16, [L2SPTerm(alpha, beta, mode="decoupled", new_params="head.*")], steps=2, out=str(tmp_path)
    )
    ref = copy.deepcopy(base).train()
    opt = finereg.DecoupledL2SP(
        torch.optim.SGD(ref.named_parameters(), lr=hf_args("x").learning_rate, momentum=0.9),
        anchors=base,
        alpha=alpha,
        beta=beta,
        new_params="head.*",
    )
    for _ in range(2):
        opt.zero_grad()
        ref(**data16.tensors).loss.backward()
        opt.step()
    assert_same_weights(model, ref)
    assert isinstance(trainer.optimizer.optimizer, finereg.DecoupledL2SP)
    penalty = finereg.L2SP(model, anchor=base, alpha=alpha, beta=beta, new_params="head.*").value()
    assert _train_logs(trainer)[-1]["l2sp"] == pytest.approx(float(penalty), rel=1e-5)


def test_resume_restores_anchors_source_and_wrapper_state(tmp_path):
    """A run interrupted at step 2 and resumed through the Trainer's own checkpoints ends with the weights of the
    uninterrupted run, although the resumed trainer was built on a model that is not the pretrained one: the
    L2-SP anchors and DELTA's source model come back from finereg_state.pt, FTP's state from optimizer.pt."""
    from tests.integrations._setup import base_model

    pretrained = base_model()
    pretrained.encoder.embeddings.requires_grad_(False)  # smaller checkpoints; frozen tensors are skipped
    data = train_data(48)  # 3 steps per epoch: the resume lands mid-epoch

    def terms():
        return [L2SPTerm(0.01), DeltaTerm(LAYERS, COEF["delta"]), WrapOptimizer(finereg.FTP)]

    kw = dict(save_strategy="steps", save_steps=2)
    full, _ = hf_run(pretrained, data, terms(), steps=3, out=str(tmp_path), **kw)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / STATE_NAME).is_file() and (ckpt / "optimizer.pt").is_file()

    other = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # attach-time anchors and source copy would be wrong
    trainer = FineregTrainer(
        model=other, args=hf_args(str(tmp_path), max_steps=3, **kw), train_dataset=data, regularizers=terms()
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert_same_weights(other, full)
    assert trainer.state.global_step == 3 and "delta" in _train_logs(trainer)[-1]

    shutil.copytree(ckpt, tmp_path / "bare")
    os.remove(tmp_path / "bare" / STATE_NAME)
    with pytest.raises(FineregError, match="finereg_state.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "bare"))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyClassifier(), tiny_data()


def test_bad_set_ups_are_refused(tiny, tmp_path):
    model, data = tiny
    args = hf_args(str(tmp_path), max_steps=1, per_device_train_batch_size=4)
    with pytest.raises(FineregError, match="mode='decoupled'"):
        FineregTrainer(model=model, args=args, train_dataset=data, regularizers=[L2SPTerm(mode="fused")])
    with pytest.raises(FineregError, match="log keys"):
        FineregTrainer(model=model, args=args, train_dataset=data, regularizers=[L2SPTerm(name="loss")])
    with pytest.raises(FineregError, match="model_init"):
        FineregTrainer(model_init=lambda: TinyClassifier(), args=args, train_dataset=data, regularizers=[L2SPTerm()])
    with pytest.raises(KeyError, match="did you mean"):
        FineregTrainer(model=model, args=args, train_dataset=data, regularizers=[DeltaTerm(["layr"])])
    with pytest.raises(TypeError):
        FineregTrainer(model=model, args=args, train_dataset=data)  # regularizers is required


def test_a_truncated_finereg_state_names_the_file(tiny, tmp_path):
    """Issue 17 item 18: a truncated finereg_state.pt on resume was torch's raw unpickling error."""
    model, data = tiny
    args = hf_args(str(tmp_path), max_steps=1, per_device_train_batch_size=4)
    trainer = FineregTrainer(model=model, args=args, train_dataset=data, regularizers=[L2SPTerm()])
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    torch.save(trainer.finereg.state_dict(), ckpt / STATE_NAME)
    trainer.finereg_load(ckpt)  # intact: loads
    data_bytes = (ckpt / STATE_NAME).read_bytes()
    (ckpt / STATE_NAME).write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(FineregError, match=r"checkpoint-1/finereg_state.pt is corrupt or unreadable"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_kd_against_a_given_teacher(tiny, tmp_path):
    """finereg_source= is the pretrained model the terms use (here KD's teacher, and the SPD anchors by name)."""
    model, data = tiny
    teacher = TinyClassifier()
    trainer = FineregTrainer(
        model=model,
        args=hf_args(str(tmp_path), max_steps=1, per_device_train_batch_size=16),
        train_dataset=data,
        regularizers=[KDTerm(1.0, 2.0), WrapOptimizer(finereg.SPD, weight_decay=0.1)],
        finereg_source=teacher,
    )
    assert trainer.finereg.source is teacher and not any(p.requires_grad for p in teacher.parameters())
    before = copy.deepcopy(model)
    with torch.no_grad():
        expected = finereg.kd_loss(
            before(**data.tensors).logits, teacher(input_ids=data.tensors["input_ids"]).logits, 2.0
        )
    trainer.train()
    assert _train_logs(trainer)[0]["kd"] == pytest.approx(float(expected), rel=1e-5)
    spd = trainer.optimizer.optimizer
    assert isinstance(spd, finereg.SPD)
    assert all(torch.equal(spd.state[p]["anchor"], q) for p, q in zip(model.parameters(), teacher.parameters()))
    assert not math.isnan(_train_logs(trainer)[0]["loss"])


@pytest.mark.distributed
def test_torchrun_two_processes_equal_one(tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo, CPU, 8 examples per process) ends with the weights and the logged
    terms of one process on batches of 16: DELTA's batch sum is scaled by the process count, BSS gathers the
    pooled embeddings of both processes, L2-SP, KD and SPD act as in one process."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {
        "one": [sys.executable, "-m", "tests.integrations._hf_ddp"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "tests.integrations._hf_ddp",
        ],
    }
    for name, cmd in runs.items():
        res = subprocess.run(
            [*cmd, str(tmp_path / name)], cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    one = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    logs = [json.loads((tmp_path / n / "logs.json").read_text()) for n in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        for k in ("loss", "task_loss", "l2sp", "delta", "bss", "kd"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k


def test_bf16_autocast_is_the_plain_loop_under_autocast(base, data16, plain_bf16, tmp_path):
    """bf16=True: the Trainer's autocast covers the model and (through accelerator.autocast) the frozen source
    model; the terms are computed in float32. Same weights as a plain loop under torch.autocast(bfloat16)."""
    methods = ("l2sp", "delta", "bss", "kd")
    model, trainer = hf_run(base, data16, make_terms(methods), steps=2, out=str(tmp_path), bf16=True)
    assert_same_weights(model, plain_bf16)
    fp32 = plain_run(base, data16, methods, steps=2)
    diff = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), fp32.state_dict().values()))
    assert diff > 1e-5  # bf16 really ran
