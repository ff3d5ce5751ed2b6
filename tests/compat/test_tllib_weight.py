"""finereg.compat.tllib: L2Regularization, SPRegularization, BatchSpectralShrinkage behave like tllib's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import finereg.compat.tllib as tllib_compat
from finereg.compat._tllib_weight import BatchSpectralShrinkage, L2Regularization, SPRegularization


def build(case, key):
    model = eval(case["arch"], {"nn": nn}).double()
    res = model.load_state_dict(case[key], strict=False)
    assert not res.unexpected_keys and all("running_" in k or "num_batches" in k for k in res.missing_keys)
    return model


def tllib_l2(model):
    """tllib's L2Regularization.forward, written out."""
    out = 0.0
    for p in model.parameters():
        out = out + 0.5 * torch.norm(p) ** 2
    return out


def tllib_sp(source_weight, target):
    """tllib's SPRegularization.forward, written out."""
    out = 0.0
    for n, p in target.named_parameters():
        out = out + 0.5 * torch.norm(p - source_weight[n]) ** 2
    return out


def test_exported_names():
    assert {"L2Regularization", "SPRegularization", "BatchSpectralShrinkage"} <= set(tllib_compat.__all__)
    assert tllib_compat.SPRegularization is SPRegularization
    assert tllib_compat.L2Regularization is L2Regularization
    assert tllib_compat.BatchSpectralShrinkage is BatchSpectralShrinkage


def test_l2_golden(golden):
    case = golden["l2"]
    model = build(case, "target_params")
    reg = L2Regularization(model)
    assert reg.model is model and "model" not in dict(reg.named_children())
    value = reg()  # tllib's call: no arguments
    torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
    value.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)


def test_sp_golden(golden):
    case = golden["l2sp"]
    source, target = build(case, "source_params"), build(case, "target_params")
    reg = SPRegularization(source, target)
    assert reg.target_model is target
    assert set(reg.source_weight) == set(case["source_params"])
    torch.testing.assert_close(reg.source_weight["3.weight"], case["source_params"]["3.weight"])
    value = reg()
    torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
    value.backward()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)
    # the fused mode is there too, with the same gradients
    target.zero_grad(set_to_none=True)
    reg.add_grad_()
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.grad, case["grads"][n], rtol=1e-6, atol=1e-8)


def test_bss_golden(golden):
    for case in golden["bss"]:
        f = case["features"].clone().requires_grad_()
        value = BatchSpectralShrinkage(k=case["k"])(f)  # tllib's call: bss(feature)
        torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
        value.backward()
        torch.testing.assert_close(f.grad, case["grad"], rtol=1e-6, atol=1e-8)
    assert BatchSpectralShrinkage().k == 1  # tllib's default


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def test_frozen_parameters_count_like_tllib():
    """tllib sums over every parameter, frozen ones included; so does the compat layer."""
    source, target = _net(0), _net(1)
    target[0].requires_grad_(False)
    torch.testing.assert_close(L2Regularization(target)(), tllib_l2(target))
    weights = {n: p.detach() for n, p in source.named_parameters()}
    torch.testing.assert_close(SPRegularization(source, target)(), tllib_sp(weights, target))


def test_sp_differences_from_tllib_are_the_documented_ones():
    source, target = _net(0), _net(1)
    weights = {n: p.detach().clone() for n, p in source.named_parameters()}
    reg = SPRegularization(source, target)
    # a wrapped target matches a plain source (tllib: KeyError 'module.0.weight')
    torch.testing.assert_close(SPRegularization(source, nn.DataParallel(target))(), reg())
    with torch.no_grad():  # tllib keeps param.detach() (a view): this edit would move its anchors; ours are copies
        for p in source.parameters():
            p.mul_(2)
    torch.testing.assert_close(reg(), tllib_sp(weights, target))
    # the source *is* the target (a snapshot): tllib's views would always give 0; ours measure the drift
    own = SPRegularization(target, target)
    assert own().item() == 0.0
    with torch.no_grad():
        target[0].weight.add_(1.0)
    torch.testing.assert_close(own(), torch.tensor(0.5 * target[0].weight.numel(), dtype=torch.float64))


def test_errors():
    source = _net(0)
    target = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2)).double()
    with pytest.raises(KeyError, match=r"no anchor for these parameters: 4\.weight"):
        SPRegularization(source, target)  # tllib: KeyError too
    with pytest.raises(TypeError, match="source_model must be an nn.Module"):
        SPRegularization(source.state_dict(), target)
    with pytest.raises(ValueError, match=r"k=3 must be smaller than min\(batch, dim\)"):
        BatchSpectralShrinkage(k=3)(torch.randn(3, 10))
    with pytest.raises(ValueError, match="shape \\(batch, dim\\)"):
        BatchSpectralShrinkage()(torch.randn(10))
