"""Bi-Tuning: the golden three-step trajectory (native API), equality with the per-sample loop reference at any
batch size (wrap-around, a class with more than K samples in a batch), what is detached, tllib-shaped state
dicts, bad input, and the DDP all_gather of keys (2 CPU processes, gloo)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg.head.bi_tuning import BiTuning, BiTuningClassifier, bi_tuning_loss

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_bi_tuning.py"
_spec = importlib.util.spec_from_file_location("bench_bi_tuning", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _objective(out, labels, trade_off=0.5):
    """tllib's Bi-Tuning objective: CE + trade_off · the contrastive term."""
    y_q, logits_z, logits_y, labels_c = out
    return F.cross_entropy(y_q, labels) + trade_off * bi_tuning_loss(logits_z, logits_y, labels_c)


def golden_encoder(case):
    enc = BiTuningClassifier(
        nn.Sequential(nn.Linear(12, case["features_dim"]), nn.ReLU()),
        case["num_classes"],
        case["projection_dim"],
        features_dim=case["features_dim"],
    ).double()
    enc.load_state_dict(case["init"]["encoder_q"])
    return enc


def run_golden(model, case, encoder_q):
    model.queue_h.copy_(case["init"]["queue_h"])
    model.queue_z.copy_(case["init"]["queue_z"])
    opt = torch.optim.SGD(encoder_q.parameters(), lr=0.1)
    close = dict(rtol=1e-6, atol=1e-8)
    for step in case["steps"]:
        y_q, logits_z, logits_y, labels_c = model(step["im_q"], step["im_k"], step["labels"])
        loss = F.cross_entropy(y_q, step["labels"]) + 0.1 * bi_tuning_loss(logits_z, logits_y, labels_c)
        for ours, key in [
            (y_q, "y_q"),
            (logits_z, "logits_z"),
            (logits_y, "logits_y"),
            (labels_c, "labels_c"),
            (loss, "loss"),
        ]:
            torch.testing.assert_close(ours.detach(), step[key], **close, msg=key)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(model.queue_h, step["queue_h_after"], **close)
        torch.testing.assert_close(model.queue_z, step["queue_z_after"], **close)
        assert torch.equal(model.queue_ptr, step["queue_ptr_after"])
        for enc, key in [(model.encoder_q, "encoder_q_after"), (model.encoder_k, "encoder_k_after")]:
            state = dict(enc.named_parameters())
            assert set(state) == set(step[key])
            for name, value in step[key].items():
                torch.testing.assert_close(state[name].detach(), value, **close, msg=f"{key}.{name}")


def test_golden_native(golden):
    case = golden["bi_tuning"]
    assert "CE(y_q, labels) + 0.1 *" in case["loss"] and "lr=0.1" in case["optimizer"]
    enc = golden_encoder(case)
    model = BiTuning(enc, K=case["K"], m=case["m"], temperature=case["T"]).double()  # key encoder: a copy of enc
    # the golden batches include one where all samples share a class (several keys of one class per step)
    assert any(len(set(s["labels"].tolist())) == 1 for s in case["steps"])
    run_golden(model, case, enc)


def small_model(C=3, K=2, F_=5, P=4, m=0.9, seed=0):
    torch.manual_seed(seed)
    enc = BiTuningClassifier(nn.Sequential(nn.Linear(6, F_), nn.Tanh()), C, P, features_dim=F_).double()
    with torch.no_grad():
        enc.head.weight.normal_()  # a non-trivial head (tllib's init is N(0, 0.01²))
        enc.head.bias.normal_()
    return BiTuning(enc, num_classes=C, K=K, m=m, temperature=0.1).double().train()


@pytest.mark.parametrize(
    "labels",
    [
        [1, 1, 1, 1, 1, 0, 2],  # 5 samples of class 1 with K = 2: wrap-around, only the last 2 survive
        [2],  # batch of one
        [0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2],  # more samples than C·K
        [2, 0],  # K % b == 0 as tllib requires
    ],
)
def test_matches_per_sample_loop_reference(labels):
    labels = torch.tensor(labels)
    fast = small_model()
    ref = copy.deepcopy(fast)
    with torch.no_grad():
        fast.queue_ptr.copy_(torch.tensor([1, 1, 0]))  # start mid-queue
        ref.queue_ptr.copy_(fast.queue_ptr)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        im_q = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
        im_k = im_q + 0.1 * torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
        outs = [fast(im_q, im_k, labels), bench.loop_forward(ref, im_q, im_k, labels)]
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(fast.queue_h, ref.queue_h, rtol=0, atol=0)
        torch.testing.assert_close(fast.queue_z, ref.queue_z, rtol=0, atol=0)
        assert torch.equal(fast.queue_ptr, ref.queue_ptr)
        grads = []
        for model, out in zip((fast, ref), outs):
            model.encoder_q.zero_grad()
            _objective(out, labels).backward()
            grads.append([p.grad.clone() for p in model.encoder_q.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_tllib_structured_reference_agrees():
    labels = torch.tensor([0, 2, 2, 1])
    fast = small_model()
    ref = copy.deepcopy(fast)
    x = torch.randn(4, 6, dtype=torch.float64)
    for a, b in zip(fast(x, x, labels), bench.tllib_structured_forward(ref, x, x, labels)):
        torch.testing.assert_close(a, b)


def test_detached_paths_and_momentum():
    model = small_model(m=0.75)
    q0 = [p.detach().clone() for p in model.encoder_q.parameters()]
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)  # the key encoder starts as a copy
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    x, labels = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 1])
    _, logits_z, logits_y, _ = model(x, x, labels)
    for p0, pk in zip(q0, model.encoder_k.parameters()):
        torch.testing.assert_close(pk, 0.75 * p0 + 0.25 * (p0 + 1.0))
    logits_y.sum().backward()
    assert model.encoder_q.head.weight.grad is None  # the head rows are read detached (tllib: head.weight.data)
    assert model.encoder_q.backbone[0].weight.grad is not None  # ĥ_q carries the gradient
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_loads_tllib_shaped_state_dict():
    C, K, F_, P = 3, 2, 5, 4
    model = small_model(C, K, F_, P)
    donor = small_model(C, K, F_, P, seed=1)
    state = {f"encoder_q.{k}": v for k, v in donor.encoder_q.state_dict().items()}
    state.update({f"encoder_k.{k}": v for k, v in donor.encoder_k.state_dict().items()})
    state.update(
        queue_h=torch.randn(F_ + 1, C, K, dtype=torch.float64),
        queue_z=torch.randn(P, C, K, dtype=torch.float64),
        queue_ptr=torch.tensor([1, 0, 1]),
    )
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state)  # strict
    assert model.queue_h.shape == (F_ + 1, C, K) and model.queue_z.shape == (P, C, K)
    assert torch.equal(model.queue_ptr, state["queue_ptr"]) and torch.equal(model.queue_h, state["queue_h"])


def test_queues_initialized_normalized():
    model = small_model(C=4, K=3)
    torch.testing.assert_close(model.queue_h.norm(dim=0), torch.ones(4, 3, dtype=torch.float64))
    torch.testing.assert_close(model.queue_z.norm(dim=0), torch.ones(4, 3, dtype=torch.float64))
    assert model.queue_ptr.dtype == torch.long and not model.queue_ptr.any()


def test_eval_mode_classifier_returns_logits():
    model = small_model()
    model.encoder_q.eval()
    out = model.encoder_q(torch.randn(2, 6, dtype=torch.float64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_bad_input():
    model = small_model()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        model(x, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="same batch size"):
        model(x, x[:1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D integer"):
        model(x, x, torch.tensor([0.0, 1.0]))
    model.eval()
    with pytest.raises(ValueError, match="call encoder_q directly"):
        model(x, x, torch.tensor([0, 1]))
    enc = model.encoder_q
    with pytest.raises(ValueError, match="K .keys per class. must be an integer >= 1"):
        BiTuning(enc, K=0)
    with pytest.raises(ValueError, match="equal to the head's out_features"):
        BiTuning(enc, num_classes=5)
    with pytest.raises(ValueError, match=r"momentum\) must be a finite number >= 0 and <= 1, got 1.5"):
        BiTuning(enc, m=1.5)
    with pytest.raises(ValueError, match="same architecture"):
        BiTuning(enc, BiTuningClassifier(nn.Linear(6, 7), 3, 4, features_dim=7))
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        BiTuning(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="give features_dim"):
        BiTuningClassifier(nn.Identity(), 3)


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_model():
    torch.manual_seed(0)
    enc = BiTuningClassifier(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), 3, 4, features_dim=5).double()
    return BiTuning(enc, num_classes=3, K=2, m=0.9, temperature=0.1).double().train()


def _ddp_batches():
    g = torch.Generator().manual_seed(7)
    labels = [torch.tensor([1, 1, 2, 1, 0, 1]), torch.tensor([2, 1, 1, 0, 0, 2])]  # class 1 on both ranks, > K
    return [(torch.randn(6, 6, generator=g, dtype=torch.float64), y) for y in labels]


def _single_process_run():
    model = _ddp_model()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    for x, y in _ddp_batches():
        loss = _objective(model(x, x + 0.05, y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # uneven shards next: rank 0 gets 4 samples, rank 1 gets 1
        x = torch.arange(30, dtype=torch.float64).view(5, 6) / 30
        model(x, x, torch.tensor([0, 2, 2, 1, 2]))
    return model


def _ddp_worker(rank, world, tmp):
    from tests._dist import gloo_group

    with gloo_group(tmp, rank, world):
        torch.set_num_threads(1)
        model = _ddp_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
        for x, y in _ddp_batches():
            xs, ys = x[rank * 3 : (rank + 1) * 3], y[rank * 3 : (rank + 1) * 3]
            loss = _objective(ddp(xs, xs + 0.05, ys), ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = torch.arange(30, dtype=torch.float64).view(5, 6) / 30
            y = torch.tensor([0, 2, 2, 1, 2])
            part = slice(0, 4) if rank == 0 else slice(4, 5)
            model(x[part], x[part], y[part])
        torch.save(
            {
                "queue_h": model.queue_h,
                "queue_z": model.queue_z,
                "queue_ptr": model.queue_ptr,
                "encoder_q": model.encoder_q.state_dict(),
            },
            f"{tmp}/rank{rank}.pt",
        )


@pytest.mark.distributed
def test_ddp_keys_of_all_ranks_enter_queues(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    expected = _single_process_run()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in results:
        torch.testing.assert_close(res["queue_h"], expected.queue_h)
        torch.testing.assert_close(res["queue_z"], expected.queue_z)
        assert torch.equal(res["queue_ptr"], expected.queue_ptr)
        for k, v in expected.encoder_q.state_dict().items():
            torch.testing.assert_close(res["encoder_q"][k], v)


def test_bi_tuning_loss_is_the_sum_of_the_two_kl_divergences():
    g = torch.Generator().manual_seed(0)
    lz = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), 1).requires_grad_()
    ly = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), 1).requires_grad_()
    lc = torch.zeros(6, 9, dtype=torch.float64)
    lc[:, :3] = 1 / 3
    value = bi_tuning_loss(lz, ly, lc)
    expected = F.kl_div(lz, lc, reduction="batchmean") + F.kl_div(ly, lc, reduction="batchmean")
    torch.testing.assert_close(value, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(value, [lz, ly]), torch.autograd.grad(expected, [lz, ly]), rtol=1e-13, atol=0
    )


def test_training_step_under_bfloat16_autocast():
    enc = BiTuningClassifier(nn.Linear(16, 8), 5, 4, features_dim=8)
    model = BiTuning(enc, K=3).train()
    x, y = torch.randn(6, 16), torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_q, logits_z, logits_y, labels_c = model(x, x + 0.01, y)
        loss = F.cross_entropy(y_q, y) + bi_tuning_loss(logits_z, logits_y, labels_c)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(enc.projector.weight.grad).all() and enc.projector.weight.grad.abs().sum() > 0
