"""DELTA penalties: golden values (tllib), layout conventions, bad input, and the DELTA pipeline end to end."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from finereg._checks import FineregError
from finereg.feature.attention import channel_attention
from finereg.feature.attention_classifier import train_attention_classifier
from finereg.feature.delta import (
    AttentionBehavioralPenalty,
    BehavioralPenalty,
    attention_behavioral_penalty,
    behavioral_penalty,
)

TOL = dict(rtol=1e-6, atol=1e-8)


def _features(case):
    src = OrderedDict(case["source_features"])
    tgt = OrderedDict((k, v.clone().requires_grad_()) for k, v in case["target_features"].items())
    return src, tgt


def _check_grads(value, tgt, ref_grads):
    value.backward()
    for name, g in ref_grads.items():
        torch.testing.assert_close(tgt[name].grad, g, **TOL)


# ---------------------------------------------------------------- penalties: golden values ----
@pytest.mark.parametrize("form", ["function", "module"])
def test_behavioral_golden(golden, form):
    case = golden["behavioral"]
    src, tgt = _features(case)
    value = behavioral_penalty(src, tgt) if form == "function" else BehavioralPenalty()(src, tgt)
    torch.testing.assert_close(value, case["value"], **TOL)
    _check_grads(value, tgt, case["grads"])


@pytest.mark.parametrize("form", ["positional", "by_name", "module", "module_by_name"])
def test_attention_behavioral_golden(golden, form):
    case = golden["attention_behavioral"]
    src, tgt = _features(case)
    att = list(case["channel_attention"])
    named = dict(zip(tgt, att))
    if form == "positional":
        value = attention_behavioral_penalty(src, tgt, att)
    elif form == "by_name":
        value = attention_behavioral_penalty(src, tgt, dict(reversed(list(named.items()))))
    elif form == "module":
        value = AttentionBehavioralPenalty(att)(src, tgt)
    else:
        value = AttentionBehavioralPenalty(named)(src, tgt)
    torch.testing.assert_close(value, case["value"], **TOL)
    _check_grads(value, tgt, case["grads"])


def test_source_is_detached():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    (behavioral_penalty({"a": s}, {"a": t}) + attention_behavioral_penalty([s], [t], [torch.ones(3)])).backward()
    assert s.grad is None and t.grad is not None


# ---------------------------------------------------------------- layout conventions ----
def _reference_4d(s, t, a):
    """tllib's formula on (b, c, h, w)."""
    b, c, h, w = s.shape
    dist = torch.norm((t - s).reshape(b, c, h * w), 2, 2)
    return 0.5 * torch.sum(c * a * dist**2 / (h * w))


def test_convention_2d_features():
    s, t, a = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), torch.rand(7).double()
    value = attention_behavioral_penalty([s], [t], [a])
    # (b, d): every feature is a channel, one position: ½·d·Σ_{n,j} a_j (t − s)²
    torch.testing.assert_close(value, 0.5 * 7 * ((t - s) ** 2 * a).sum(), **TOL)
    torch.testing.assert_close(value, _reference_4d(s[..., None, None], t[..., None, None], a), **TOL)


def test_convention_token_features():
    b, n, d = 3, 6, 5
    s, t = torch.randn(b, n, d, dtype=torch.float64), torch.randn(b, n, d, dtype=torch.float64)
    a = torch.rand(d, dtype=torch.float64)
    value = attention_behavioral_penalty({"h": s}, {"h": t}, {"h": a})
    # (b, tokens, d): channels = d (last), positions = tokens
    as_map = lambda x: x.transpose(1, 2)[..., None]  # (b, d, tokens, 1)
    torch.testing.assert_close(value, _reference_4d(as_map(s), as_map(t), a), **TOL)
    # channel_dim=1 reads (b, c, L) maps of 1-D convolutions instead
    a2 = torch.rand(n, dtype=torch.float64)
    torch.testing.assert_close(
        attention_behavioral_penalty([s], [t], [a2], channel_dim=1),
        _reference_4d(s[..., None], t[..., None], a2),
        **TOL,
    )
    with pytest.raises(ValueError, match="channels along dim 2.*channel_dim"):
        attention_behavioral_penalty([s], [t], [a2])


def test_mixed_layers_and_5d():
    s = [torch.randn(2, 4, 3, 3, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)]
    t = [x + 0.1 * torch.randn_like(x) for x in s]
    a = [torch.rand(4, dtype=torch.float64), torch.rand(6, dtype=torch.float64)]
    value = attention_behavioral_penalty(s, t, a)
    ref = _reference_4d(s[0].flatten(3), t[0].flatten(3), a[0]) + _reference_4d(
        s[1][..., None, None], t[1][..., None, None], a[1]
    )
    torch.testing.assert_close(value, ref, **TOL)


def test_module_buffers_follow_dtype_and_state_dict():
    pen = AttentionBehavioralPenalty({"x": torch.ones(3)})
    assert pen.attention_0.dtype == torch.float32
    pen = pen.double()
    assert pen.attention_0.dtype == torch.float64 and "attention_0" in pen.state_dict()
    s, t = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(pen({"x": s}, {"x": t}), torch.tensor(0.5 * 3 * 6, dtype=torch.float64))
    assert "layers=['x']" in repr(pen)


# ---------------------------------------------------------------- penalties: bad input ----
def test_penalty_errors():
    s, t = {"a": torch.zeros(2, 3, 4, 4)}, {"a": torch.zeros(2, 3, 4, 4)}
    with pytest.raises(ValueError, match="different layers: only in source \\['a'\\], only in target \\['b'\\]"):
        behavioral_penalty(s, {"b": t["a"]})
    with pytest.raises(ValueError, match="source features have shape \\(2, 3, 4, 4\\) but target"):
        behavioral_penalty(s, {"a": torch.zeros(2, 3, 4, 5)})
    with pytest.raises(TypeError, match="both be mappings"):
        behavioral_penalty(s, [t["a"]])
    with pytest.raises(ValueError, match="no features given"):
        behavioral_penalty({}, {})
    with pytest.raises(ValueError, match="attention has shape \\(4,\\) but the features .* have 3 channels"):
        attention_behavioral_penalty(s, t, [torch.ones(4)])
    with pytest.raises(ValueError, match="2 attention vectors for 1 feature layers"):
        attention_behavioral_penalty(s, t, [torch.ones(3), torch.ones(3)])
    with pytest.raises(KeyError, match="attention vector for layer"):
        attention_behavioral_penalty(s, t, {"b": torch.ones(3)})
    with pytest.raises(ValueError, match="NaN"):
        AttentionBehavioralPenalty([torch.tensor([float("nan"), 1.0])])
    with pytest.raises(ValueError, match="empty"):
        AttentionBehavioralPenalty([])
    with pytest.raises(ValueError, match="no batch and channel dimension"):
        attention_behavioral_penalty([torch.zeros(3)], [torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="not a non-batch dimension"):
        attention_behavioral_penalty(s, t, [torch.ones(2)], channel_dim=0)


def test_delta_pipeline_with_capture():
    """Attention classifier → channel attention → penalty on captured features, end to end."""
    import copy

    from finereg.feature.capture import FeatureCapture

    torch.manual_seed(1)
    source = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )
    data = [(torch.randn(8, 3, 9, 9), torch.randint(0, 2, (8,))) for _ in range(2)]
    clf = copy.deepcopy(source)
    train_attention_classifier(clf, "6", data, epochs=2)
    att = channel_attention(clf.eval(), ["0", "2"], data)
    pen = AttentionBehavioralPenalty(att)
    target = copy.deepcopy(source)
    with FeatureCapture(source, ["0", "2"], detach=True) as cs, FeatureCapture(target, ["0", "2"]) as ct:
        source(data[0][0])
        target(data[0][0])
        assert pen(cs.outputs, ct.outputs).item() == 0.0
        with torch.no_grad():
            target[2].weight.add_(0.1)
        target(data[0][0])
        value = pen(cs.outputs, ct.outputs)
    value.backward()
    assert value.item() > 0 and target[2].weight.grad is not None and source[2].weight.grad is None


def test_negative_attention_weights_are_refused():
    """issue 9 #11: a negative weight rewards drifting away from the source features; it was accepted."""
    s, t = {"a": torch.zeros(2, 3, 4, 4)}, {"a": torch.ones(2, 3, 4, 4)}
    bad = torch.tensor([0.5, 0.7, -0.2])
    with pytest.raises(FineregError, match="layer 'a': attention has negative weights"):
        attention_behavioral_penalty(s, t, {"a": bad})
    with pytest.raises(FineregError, match="attention has negative weights"):
        AttentionBehavioralPenalty({"a": bad})


def test_low_precision_features_accumulate_in_float32():
    """issue 9 #11: on float16 features the squared differences overflowed (65504) and the penalty was inf."""
    g = torch.Generator().manual_seed(0)
    s32 = torch.randn(4, 3, 5, 5, generator=g) * 300
    t32 = torch.randn(4, 3, 5, 5, generator=g) * 300
    att = torch.tensor([0.2, 0.3, 0.5])
    for dtype in (torch.float16, torch.bfloat16):
        s, t = s32.to(dtype), t32.to(dtype).requires_grad_()
        ref_s, ref_t = s.double(), t.detach().double()
        value = behavioral_penalty({"a": s}, {"a": t})
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value.double(), behavioral_penalty({"a": ref_s}, {"a": ref_t}), rtol=1e-5, atol=0)
        weighted = attention_behavioral_penalty({"a": s}, {"a": t}, {"a": att})
        expected = attention_behavioral_penalty({"a": ref_s}, {"a": ref_t}, {"a": att.double()})
        torch.testing.assert_close(weighted.double(), expected, rtol=1e-5, atol=0)
        (value + weighted).backward()
        assert t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()


def test_empty_batch_of_features():
    s, t = {"a": torch.zeros(0, 3, 4, 4)}, {"a": torch.zeros(0, 3, 4, 4)}
    assert attention_behavioral_penalty(s, t, {"a": torch.ones(3) / 3}).item() == 0.0  # a sum over no sample
    assert behavioral_penalty(s, t).item() == 0.0
