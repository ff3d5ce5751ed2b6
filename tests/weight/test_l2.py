"""L2 and L2-SP (finereg.weight.l2): tllib's numbers, the fused gradient mode, names, devices, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from finereg.weight.l2 import L2, L2SP, canonical_name


def build(case, key):
    """A golden case's model in float64 with the parameters under ``key`` (buffers left at their defaults)."""
    model = eval(case["arch"], {"nn": nn}).double()
    res = model.load_state_dict(case[key], strict=False)
    assert not res.unexpected_keys and all("running_" in k or "num_batches" in k for k in res.missing_keys)
    return model


def small(seed=0, classes=3, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, classes)).to(dtype)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def reference(target, anchors, alpha=1.0, beta=1.0):
    """The L2-SP formula written out: α/2 Σ‖w − w0‖² over anchored names, β/2 Σ‖w‖² over the rest."""
    out = 0.0
    for n, p in target.named_parameters():
        if n in anchors:
            out = out + 0.5 * alpha * (p - anchors[n]).pow(2).sum()
        else:
            out = out + 0.5 * beta * p.pow(2).sum()
    return out


# --- tllib's golden numbers through the native API -------------------------------------------------------


def test_l2_golden(golden):
    case = golden["l2"]
    model = build(case, "target_params")
    value = L2(model)()
    torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
    value.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("anchor_kind", ["model", "state_dict", "dataparallel"])
def test_l2sp_golden(golden, anchor_kind):
    case = golden["l2sp"]
    source, target = build(case, "source_params"), build(case, "target_params")
    anchor = {"model": source, "state_dict": source.state_dict(), "dataparallel": nn.DataParallel(source)}[anchor_kind]
    reg = L2SP(target, anchor)
    assert reg.anchored_names == [n for n, _ in target.named_parameters()] and reg.unanchored_names == []
    value = reg()
    torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
    value.backward()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)


def test_golden_fused_mode(golden):
    """Mode (b) gives tllib's gradients too, from .grad = None."""
    case = golden["l2sp"]
    source, target = build(case, "source_params"), build(case, "target_params")
    L2SP(target, source).add_grad_()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)
    case = golden["l2"]
    model = build(case, "target_params")
    L2(model).add_grad_()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)


# --- the fused mode --------------------------------------------------------------------------------------


def _new_head_pair():
    source = small(0, classes=4)
    target = small(1, classes=3)  # same body, a new head of another size
    return source, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_autograd(dtype):
    source, target = _new_head_pair()
    source, target = source.to(dtype), target.to(dtype)
    x, y = torch.randn(8, 6, dtype=dtype), torch.randint(0, 3, (8,))
    reg = L2SP(target, source, alpha=0.3, beta=0.05, new_params="3.*")
    assert reg.unanchored_names == ["3.weight", "3.bias"] and len(reg.anchored_names) == 4

    target.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(target(x), y) + reg()).backward()
    ga = grads(target)
    target.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(target(x), y).backward()
    reg.add_grad_()
    gb = grads(target)
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], **tol)
    # and both are the formula's gradient
    anchors = {n: p.detach() for n, p in source.named_parameters() if not n.startswith("3.")}
    target.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(target(x), y) + reference(target, anchors, 0.3, 0.05)).backward()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, ga[n], **tol)


def test_fused_scale_and_missing_grads():
    source, target = small(0), small(1)
    reg = L2SP(target, source, alpha=0.5)
    target[0].weight.grad = torch.ones_like(target[0].weight)  # some grads exist, the others are None
    reg.add_grad_(scale=4.0)
    w0 = source[0].weight.detach()
    torch.testing.assert_close(target[0].weight.grad, 1 + 2.0 * (target[0].weight.detach() - w0))
    torch.testing.assert_close(target[3].bias.grad, 2.0 * (target[3].bias.detach() - source[3].bias.detach()))
    assert target[3].bias.grad.data_ptr() != target[3].bias.data_ptr()


def test_fused_unanchored_grad_none_is_not_an_alias():
    model = small(0)
    L2(model, factor=2.0).add_grad_()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, 2.0 * p.detach())
        assert p.grad.data_ptr() != p.data_ptr()
    before = model[0].weight.detach().clone()
    model[0].weight.grad.zero_()
    assert torch.equal(model[0].weight.detach(), before)


def test_same_trajectory_for_sgd_steps():
    source, target_a = _new_head_pair()
    target_b = copy.deepcopy(target_a)
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(5)]
    reg_a = L2SP(target_a, source, alpha=0.2, beta=0.01, new_params="3.*")
    reg_b = L2SP(target_b, source, alpha=0.2, beta=0.01, new_params="3.*")
    opt_a = torch.optim.SGD(target_a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(target_b.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        opt_a.zero_grad()
        (nn.functional.cross_entropy(target_a(x), y) + reg_a()).backward()
        opt_a.step()
        opt_b.zero_grad()
        nn.functional.cross_entropy(target_b(x), y).backward()
        reg_b.add_grad_()
        opt_b.step()
    moved = 0.0
    for (_n, pa), pb, p0 in zip(target_a.named_parameters(), target_b.parameters(), _new_head_pair()[1].parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-8)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-2  # the steps did something
    torch.testing.assert_close(reg_b.value(), reg_a.value(), rtol=1e-6, atol=1e-8)


# --- selection by name -----------------------------------------------------------------------------------


def test_snapshot_anchor_none_and_copies():
    model = small(0)
    reg = L2SP(model)  # snapshot of itself
    assert reg().item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(reg(), torch.tensor(0.5 * model[0].weight.numel(), dtype=torch.float64))

    source, target = small(0), small(1)
    reg = L2SP(target, source)
    before = reg().item()
    with torch.no_grad():  # editing the source later does not move the anchors (tllib's view would)
        for p in source.parameters():
            p.add_(3.0)
    assert reg().item() == before


def test_include_exclude_and_unanchored_modes():
    source, target = _new_head_pair()
    reg = L2SP(target, source, include=["0.*", "3.*"], exclude="*.bias", new_params="3.*")
    assert reg.anchored_names == ["0.weight"] and reg.unanchored_names == ["3.weight"]
    expect = 0.5 * (target[0].weight - source[0].weight.detach()).pow(2).sum() + 0.5 * target[3].weight.pow(2).sum()
    torch.testing.assert_close(reg(), expect)

    src_body = {k: v for k, v in source.state_dict().items() if not k.startswith("3.")}
    reg = L2SP(target, src_body, unanchored="ignore")
    assert reg.unanchored_names == [] and len(reg.anchored_names) == 4
    reg = L2SP(target, src_body, alpha=1.0, beta=0.0)  # beta 0: the head contributes nothing
    torch.testing.assert_close(
        reg(),
        reference(
            target, {k: v for k, v in src_body.items() if "running" not in k and "num_batches" not in k}, 1.0, 0.0
        ),
    )
    with pytest.raises(KeyError, match=r"no anchor for these parameters: 3\.weight.*unanchored='l2'"):
        L2SP(target, src_body, unanchored="error")


def test_l2_include_exclude():
    model = small(0)
    reg = L2(model, factor=0.1, exclude=["*.bias", "1.*"])
    assert reg.unanchored_names == ["0.weight", "3.weight"]
    torch.testing.assert_close(reg(), 0.05 * (model[0].weight.pow(2).sum() + model[3].weight.pow(2).sum()))


def test_wrapped_models_match_plain_source():
    source, target = small(0), small(1)
    expect = L2SP(target, source)().item()
    assert L2SP(nn.DataParallel(target), source)().item() == expect
    sd = {"module." + k: v for k, v in source.state_dict().items()}  # a DDP checkpoint
    assert L2SP(target, sd)().item() == expect
    assert canonical_name("module._orig_mod.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert canonical_name("fc.parametrizations.weight.original") == "fc.weight"


def test_parametrized_weight_matches_plain_name():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    source, target = small(0), small(1)
    parametrize.register_parametrization(target[0], "weight", Scale())
    reg = L2SP(target, source)
    assert "0.weight" in reg.anchored_names
    orig = target[0].parametrizations.weight.original
    torch.testing.assert_close(reg.anchor("0.weight"), source[0].weight.detach())
    reg.add_grad_()
    torch.testing.assert_close(orig.grad, orig.detach() - source[0].weight.detach())


def test_torch_compile_names():
    """A compiled model (names under ``_orig_mod.``) matches the plain source. backend='aot_eager' (traced
    forward and backward, ~1 s) instead of inductor (~6 s of C++ compilation on 2 cores): the regularizer
    only reads the names and parameter objects, which every backend shares."""
    source, target = small(0), small(1)
    compiled = torch.compile(target, backend="aot_eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    reg = L2SP(compiled, source)
    torch.testing.assert_close(reg(), L2SP(target, source)())
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    (nn.functional.cross_entropy(compiled(x), y) + reg()).backward()
    ga = grads(target)
    target.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(compiled(x), y).backward()
    reg.add_grad_()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, ga[n], rtol=1e-6, atol=1e-8)


# --- frozen parameters ------------------------------------------------------------------------------------


def test_frozen_parameters():
    source, target = small(0), small(1)
    target[0].requires_grad_(False)
    body = {n: p.detach() for n, p in source.named_parameters()}
    reg = L2SP(target, source)  # skip_frozen=True (default)
    expect = sum(0.5 * (p - body[n]).pow(2).sum() for n, p in target.named_parameters() if not n.startswith("0."))
    torch.testing.assert_close(reg(), expect)
    reg.add_grad_()
    assert target[0].weight.grad is None and target[3].weight.grad is not None
    all_in = L2SP(target, source, skip_frozen=False)  # tllib's value: frozen weights counted
    torch.testing.assert_close(all_in(), reference(target, body))
    target.zero_grad(set_to_none=True)
    all_in().backward()
    assert target[0].weight.grad is None
    torch.testing.assert_close(target[3].weight.grad, target[3].weight.detach() - body["3.weight"])
    target.zero_grad(set_to_none=True)
    all_in.add_grad_()  # still never creates a grad on a frozen tensor
    assert target[0].weight.grad is None
    target[0].requires_grad_(True)  # gradual unfreezing is seen at the next call
    torch.testing.assert_close(reg(), reference(target, body))


# --- devices, dtypes, state_dict --------------------------------------------------------------------------


def test_anchors_follow_to_and_state_dict_round_trip():
    source, target = small(0, dtype=torch.float32), small(1, dtype=torch.float32)
    reg = L2SP(target, source)
    assert all(b.dtype == torch.float32 for b in reg.buffers())
    reg.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in reg.buffers())
    target.double()
    expect = reference(target, {n: p.detach().double() for n, p in source.named_parameters()})
    torch.testing.assert_close(reg(), expect)

    state = reg.state_dict()
    assert set(state) == {"anchors." + n.replace(".", "/") for n in reg.anchored_names}
    fresh = L2SP(target)  # snapshot of the current weights: penalty 0
    assert fresh().item() == 0.0
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(), expect)
    torch.testing.assert_close(fresh.anchor("3.weight"), source[3].weight.detach().double())


def test_model_moved_after_construction():
    source, target = small(0, dtype=torch.float32), small(1, dtype=torch.float32)
    reg = L2SP(target, source)
    target.double()  # same Parameter objects, new dtype; the anchors follow at the next call
    value = reg()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, reference(target, {n: p.detach().double() for n, p in source.named_parameters()}))
    assert all(b.dtype == torch.float64 for b in reg.buffers())
    reg.add_grad_()
    assert target[0].weight.grad.dtype == torch.float64


def test_mixed_dtypes():
    """Parameters of several dtypes: each (device, dtype) group gets its own multi-tensor kernels."""
    source, target = small(0), small(1)
    target[3].float()
    source_w = {n: p.detach() for n, p in source.named_parameters()}
    reg = L2SP(target, source, alpha=0.5)
    assert reg.anchor("3.weight").dtype == torch.float64  # follows on the first call
    value = reg()
    assert value.dtype == torch.float64 and reg.anchor("3.weight").dtype == torch.float32
    expect = 0.5 * sum(
        0.5 * (p.double() - source_w[n].to(p.dtype).double()).pow(2).sum() for n, p in target.named_parameters()
    )
    torch.testing.assert_close(value, expect, rtol=1e-6, atol=1e-8)
    value.backward()
    ga = grads(target)
    assert ga["3.weight"].dtype == torch.float32
    target.zero_grad(set_to_none=True)
    reg.add_grad_()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, ga[n])


# --- bad input --------------------------------------------------------------------------------------------


def test_errors():
    source, target = small(0, classes=4), small(1, classes=3)
    with pytest.raises(
        ValueError, match=r"(?s)different shape.*3\.weight: model \(3, 5\) vs anchor \(4, 5\).*new_params"
    ):
        L2SP(target, source)
    with pytest.raises(
        ValueError, match=r"(?s)no parameter of the model matched.*model: 0\.weight.*anchor: backbone\.w"
    ):
        L2SP(target, {"backbone.w": torch.zeros(2)})
    with pytest.raises(KeyError, match=r"include pattern 'layer9\.\*' matches no parameter"):
        L2SP(target, include="layer9.*")
    with pytest.raises(KeyError, match=r"exclude pattern '3\.weigth' .*did you mean.*'3\.weight'"):
        L2(target, exclude="3.weigth")
    with pytest.raises(ValueError, match="leave no parameter"):
        L2(target, include="0.*", exclude="0.*")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        L2SP(target, alpha=-1)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        L2SP(target, beta=float("nan"))
    with pytest.raises(ValueError, match="unanchored must be one of 'l2', 'ignore', 'error', got 'zero'"):
        L2SP(target, unanchored="zero")
    with pytest.raises(TypeError, match="anchor must be a source model, a state_dict"):
        L2SP(target, anchor=[1, 2])
    with pytest.raises(TypeError, match=r"anchor\['x'\] is a int"):
        L2SP(target, anchor={"x": 1})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        L2(torch.zeros(3))
    with pytest.raises(ValueError, match="no parameters to regularize"):
        L2(nn.ReLU())
    with pytest.raises(TypeError, match="scale must be a finite number, got .2."):
        L2(target).add_grad_(scale="2")
    with pytest.raises(KeyError, match=r"no anchor for '0\.wieght'.*'0\.weight'"):
        L2SP(target).anchor("0.wieght")
    with pytest.raises(TypeError, match="skip_frozen must be True or False"):
        L2(target, skip_frozen="yes")


# --- DistributedDataParallel (2 gloo CPU processes) ------------------------------------------------------

WORLD = 2


def _ddp_batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _ddp_worker(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests._dist import gloo_group

    torch.set_num_threads(1)
    with gloo_group(tmp, rank, WORLD):
        source, target = small(0), small(1)
        ddp = DDP(target)
        assert next(iter(dict(ddp.named_parameters()))).startswith("module.")
        reg = L2SP(ddp, source, alpha=0.3)  # anchors from the plain source model
        x, y = _ddp_batch(rank)
        value = reg().detach()
        (nn.functional.cross_entropy(ddp(x), y) + reg()).backward()
        ga = grads(target)
        ddp.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        reg.add_grad_()
        torch.save(dict(value=value, ga=ga, gb=grads(target)), f"{tmp}/rank{rank}.pt")


@pytest.mark.distributed
def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    source, target = small(0), small(1)
    reg = L2SP(target, source, alpha=0.3)
    value = reg().detach()
    loss = sum(nn.functional.cross_entropy(target(x), y) for x, y in map(_ddp_batch, range(WORLD))) / WORLD
    (loss + reg()).backward()
    expect = grads(target)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(out["value"], value, rtol=1e-6, atol=1e-8)
        for n in expect:
            torch.testing.assert_close(out["ga"][n], expect[n], rtol=1e-6, atol=1e-8)  # penalty in the loss
            torch.testing.assert_close(out["gb"][n], expect[n], rtol=1e-6, atol=1e-8)  # fused after backward
