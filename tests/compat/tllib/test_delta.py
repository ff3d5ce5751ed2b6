"""finereg.compat.tllib.delta: L2Regularization, SPRegularization, the behavioral regularizers, the layer getter
and calculate_channel_attention behave like tllib's (golden numbers, signatures, the documented differences)."""

import inspect
from collections import OrderedDict

import pytest
import torch
from torch import nn

from finereg.compat.tllib.delta import (
    AttentionBehavioralRegularization,
    BehavioralRegularization,
    IntermediateLayerGetter,
    L2Regularization,
    SPRegularization,
    calculate_channel_attention,
    get_attribute,
)

TOL = dict(rtol=1e-6, atol=1e-8)


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


def test_sp_errors():
    source = _net(0)
    target = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2)).double()
    with pytest.raises(KeyError, match=r"no anchor for these parameters: 4\.weight"):
        SPRegularization(source, target)  # tllib: KeyError too
    with pytest.raises(TypeError, match="source_model must be an nn.Module"):
        SPRegularization(source.state_dict(), target)


def test_get_attribute_is_tllibs():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3)))
    assert get_attribute(model, "0.0.weight") is model[0][0].weight
    assert get_attribute(model, "0.9.weight", None) is None  # tllib passes the default to every step
    with pytest.raises(AttributeError):
        get_attribute(model, "0.9")


def test_signatures_are_tllibs():
    params = lambda f: list(inspect.signature(f).parameters)
    assert params(BehavioralRegularization) == []
    assert params(BehavioralRegularization.forward) == ["self", "layer_outputs_source", "layer_outputs_target"]
    assert params(AttentionBehavioralRegularization) == ["channel_attention"]
    assert params(AttentionBehavioralRegularization.forward) == ["self", "layer_outputs_source", "layer_outputs_target"]
    sig = inspect.signature(IntermediateLayerGetter)
    assert list(sig.parameters) == ["model", "return_layers", "keep_output"]
    assert sig.parameters["keep_output"].default is True
    assert params(calculate_channel_attention) == ["model", "layers", "batches", "criterion"]


def _features(case):
    src = OrderedDict(case["source_features"])
    tgt = OrderedDict((k, v.clone().requires_grad_()) for k, v in case["target_features"].items())
    return src, tgt


def test_behavioral_golden(golden):
    case = golden["behavioral"]
    src, tgt = _features(case)
    value = BehavioralRegularization()(src, tgt)
    torch.testing.assert_close(value, case["value"], **TOL)
    value.backward()
    for k, g in case["grads"].items():
        torch.testing.assert_close(tgt[k].grad, g, **TOL)


def test_attention_behavioral_golden(golden):
    case = golden["attention_behavioral"]
    src, tgt = _features(case)
    reg = AttentionBehavioralRegularization(list(case["channel_attention"]))
    assert len(reg.channel_attention) == 3
    value = reg(src, tgt)
    torch.testing.assert_close(value, case["value"], **TOL)
    value.backward()
    for k, g in case["grads"].items():
        torch.testing.assert_close(tgt[k].grad, g, **TOL)


def test_behavioral_mismatching_layers_raise(golden):
    case = golden["behavioral"]
    src, tgt = _features(case)
    tgt.pop("layer1")
    with pytest.raises(ValueError, match="only in source \\['layer1'\\]"):
        BehavioralRegularization()(src, tgt)
    src, tgt = _features(case)
    with pytest.raises(ValueError, match="layer 'layer0': attention has shape \\(3,\\)"):
        AttentionBehavioralRegularization([torch.ones(3)] * 3)(src, tgt)
    with pytest.raises(ValueError, match="2 attention vectors for 3 feature layers"):
        AttentionBehavioralRegularization([torch.ones(3)] * 2)(src, tgt)


def test_layer_getter_golden(golden, build_arch):
    case = golden["layer_getter"]
    model = build_arch(case).train()
    getter = IntermediateLayerGetter(model, return_layers=list(case["return_layers"]))
    feats, out = getter(case["input"])
    assert isinstance(feats, OrderedDict) and list(feats) == list(case["return_layers"])
    for k, ref in case["features"].items():
        torch.testing.assert_close(feats[k], ref, **TOL)
    torch.testing.assert_close(out, case["output"], **TOL)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind
    feats2, none = IntermediateLayerGetter(model, ["7", "0"], keep_output=False)(case["input"])
    assert none is None and list(feats2) == ["7", "0"]  # return_layers order, as tllib documents


def test_layer_getter_unknown_name(golden, build_arch):
    model = build_arch(golden["layer_getter"])
    with pytest.raises(AttributeError, match="did you mean"):
        IntermediateLayerGetter(model, ["0", "33"])


def test_calculate_channel_attention_golden(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).eval()
    att = calculate_channel_attention(model, list(case["layers"]), [tuple(b) for b in case["batches"]])
    assert isinstance(att, list) and len(att) == 2
    for got, ref in zip(att, case["attention"]):
        assert got.dtype == torch.float32  # as tllib's script returns it
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_calculate_channel_attention_uses_model_state(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).train()
    with pytest.raises(ValueError, match="eval mode"):
        calculate_channel_attention(model, list(case["layers"]), [tuple(b) for b in case["batches"]])
    assert model.training  # not switched silently


def test_calculate_channel_attention_with_criterion(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).eval()
    batches = [tuple(b) for b in case["batches"]]
    same = calculate_channel_attention(model, ["3"], batches, criterion=nn.CrossEntropyLoss())
    torch.testing.assert_close(same[0].double(), case["attention"][1], **TOL)
    other = calculate_channel_attention(model, ["3"], batches, criterion=nn.CrossEntropyLoss(label_smoothing=0.5))
    assert not torch.allclose(other[0], same[0])
