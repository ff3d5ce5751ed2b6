"""finereg.compat.tllib's feature names: tllib's signatures, call conventions and golden numbers."""

import inspect
from collections import OrderedDict

import pytest
import torch
from torch import nn

from finereg.compat import _tllib_feature
from finereg.compat._tllib_feature import (
    AttentionBehavioralRegularization,
    BehavioralRegularization,
    IntermediateLayerGetter,
    channel_attention,
)

TOL = dict(rtol=1e-6, atol=1e-8)


def test_all_and_reexport():
    from finereg.compat import tllib

    assert _tllib_feature.__all__ == [
        "BehavioralRegularization",
        "AttentionBehavioralRegularization",
        "IntermediateLayerGetter",
        "channel_attention",
    ]
    for name in _tllib_feature.__all__:
        assert getattr(tllib, name) is getattr(_tllib_feature, name)


def test_signatures_are_tllibs():
    params = lambda f: list(inspect.signature(f).parameters)
    assert params(BehavioralRegularization) == []
    assert params(BehavioralRegularization.forward) == ["self", "layer_outputs_source", "layer_outputs_target"]
    assert params(AttentionBehavioralRegularization) == ["channel_attention"]
    assert params(AttentionBehavioralRegularization.forward) == ["self", "layer_outputs_source", "layer_outputs_target"]
    sig = inspect.signature(IntermediateLayerGetter)
    assert list(sig.parameters) == ["model", "return_layers", "keep_output"]
    assert sig.parameters["keep_output"].default is True
    assert params(channel_attention) == ["model", "layers", "batches", "criterion"]


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


def test_channel_attention_golden(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).eval()
    att = channel_attention(model, list(case["layers"]), [tuple(b) for b in case["batches"]])
    assert isinstance(att, list) and len(att) == 2
    for got, ref in zip(att, case["attention"]):
        assert got.dtype == torch.float32  # as tllib's script returns it
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_channel_attention_uses_model_state(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).train()
    with pytest.raises(ValueError, match="eval mode"):
        channel_attention(model, list(case["layers"]), [tuple(b) for b in case["batches"]])
    assert model.training  # not switched silently


def test_channel_attention_with_criterion(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).eval()
    batches = [tuple(b) for b in case["batches"]]
    same = channel_attention(model, ["3"], batches, criterion=nn.CrossEntropyLoss())
    torch.testing.assert_close(same[0].double(), case["attention"][1], **TOL)
    other = channel_attention(model, ["3"], batches, criterion=nn.CrossEntropyLoss(label_smoothing=0.5))
    assert not torch.allclose(other[0], same[0])
