"""Channel attention: golden values (tllib's per-channel ablation), batched == per-channel loop on real models,
Taylor, attention from importance, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg._checks import FineregError
from finereg.feature.attention import attention_from_importance, channel_attention, channel_importance

TOL = dict(rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- channel attention: golden ----
def _golden_attention_setup(golden, build_arch):
    case = golden["channel_attention"]
    model = build_arch(case).eval()
    return case, model, [tuple(b) for b in case["batches"]]


@pytest.mark.parametrize("strategy,chunk", [("split", None), ("split", 1), ("split", 5), ("hook", 3), ("auto", 100)])
def test_channel_attention_golden(golden, build_arch, strategy, chunk):
    case, model, batches = _golden_attention_setup(golden, build_arch)
    imp = channel_importance(model, case["layers"], batches, strategy=strategy, chunk_size=chunk)
    assert list(imp) == list(case["layers"])
    for got, ref in zip(imp.values(), case["raw_loss_increase"]):
        torch.testing.assert_close(got, ref, **TOL)
    att = channel_attention(model, case["layers"], iter(batches), strategy=strategy, chunk_size=chunk)
    for got, ref in zip(att.values(), case["attention"]):
        torch.testing.assert_close(got, ref, **TOL)
        assert got.dtype == torch.float64  # the model's dtype


def test_model_state_untouched(golden, build_arch):
    case, model, batches = _golden_attention_setup(golden, build_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_importance(model, case["layers"], batches)
    channel_importance(model, case["layers"], batches, method="taylor")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- batched == per-channel loop ----
def naive_importance(model, layers, batches, criterion=F.cross_entropy, channels=None):
    """tllib's loop: weight[j] = 0, full forward, restore; running mean over batches."""
    out = {}
    with torch.no_grad():
        for name in layers:
            w = model.get_submodule(name).weight
            js = range(w.shape[0]) if channels is None else channels
            vals = torch.zeros(len(js), dtype=torch.float64)
            for i, (x, y) in enumerate(batches):
                loss0 = criterion(model(x), y)
                for jj, j in enumerate(js):
                    tmp = w[j].clone()
                    w[j] = 0
                    vals[jj] = (i * vals[jj] + (criterion(model(x), y) - loss0).item()) / (i + 1)
                    w[j] = tmp
            out[name] = vals
    return out


def test_resnet_matches_loop_with_residual_branch():
    """torchvision ResNet (BasicBlock, one block per stage: ResNet-18's blocks, kept small for CI time), float64."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4).double().eval()
    batches = [(torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3])) for _ in range(2)]
    layers = ["layer3.0.conv1", "layer4.0.conv2"]  # the downsample / identity branches cross both cuts
    exact = channel_importance(model, layers, batches, strategy="split", chunk_size=128)
    assert [v.numel() for v in exact.values()] == [256, 512]
    js = [0, 5, 17, 100, 255]
    ref = naive_importance(model, layers, batches, channels=js)
    for name in layers:
        torch.testing.assert_close(exact[name][js], ref[name], rtol=1e-9, atol=1e-12)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(torch.tanh(self.fc2(h)) + h)  # skip connection around fc2


class _Shared(_MLP):
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc2(h)))))  # fc2 called twice


class _Dynamic(_MLP):
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.out(self.fc2(h))


class _BatchSizeAfter(_MLP):
    def forward(self, x):
        b = x.shape[0]  # an int computed before the layer, used after it
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.out(h.reshape(b, -1))


class _TokenLinear(nn.Module):
    """(b, tokens, d) layout: Linear channels are the last dim."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)).mean(1))


@pytest.mark.parametrize(
    "cls,strategy",
    [
        (_MLP, "split"),
        (_Shared, "auto"),
        (_Shared, "hook"),
        (_Dynamic, "auto"),
        (_BatchSizeAfter, "auto"),
        (_TokenLinear, "split"),
    ],
)
def test_linear_models_match_loop(cls, strategy):
    model = cls().double().eval()
    shape = (4, 3, 5) if cls is _TokenLinear else (4, 6)
    batches = [(torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    layers = ["proj"] if cls is _TokenLinear else ["fc1", "fc2"]
    got = channel_importance(model, layers, batches, strategy=strategy, chunk_size=3)
    ref = naive_importance(model, layers, batches)
    for name in layers:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "cls,match",
    [
        (_Shared, "calls layer 'fc2' 2 times"),
        (_Dynamic, "could not trace"),
        (_BatchSizeAfter, "not a tensor with the batch"),
    ],
)
def test_split_refuses_what_it_cannot_batch(cls, match):
    model = cls().double().eval()
    batches = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    with pytest.raises(RuntimeError, match=match):
        channel_importance(model, ["fc2"], batches, strategy="split")


def test_custom_criteria_match_loop():
    model = _MLP().double().eval()
    batches = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(2)]
    smooth = nn.CrossEntropyLoss(label_smoothing=0.2)
    for crit in (smooth, lambda out, y: F.cross_entropy(out, y) + 0.0 * float(out.sum().item())):  # 2nd: no vmap
        got = channel_importance(model, ["fc1"], batches, crit, chunk_size=4)
        ref = naive_importance(model, ["fc1"], batches, criterion=crit)
        torch.testing.assert_close(got["fc1"], ref["fc1"], rtol=1e-9, atol=1e-12)


def test_wrapped_models_are_evaluated_unwrapped():
    model = _MLP().double().eval()
    batches = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    ref = channel_importance(model, ["fc1"], batches)["fc1"]
    compiled = torch.compile(model, backend="eager")
    compiled(batches[0][0])  # hooks added after a compiled call would not run in compiled code
    for wrapped in (compiled, nn.DataParallel(model)):
        for strategy in ("split", "hook"):
            name = "module.fc1" if isinstance(wrapped, nn.DataParallel) else "fc1"
            got = channel_importance(wrapped, [name], batches, strategy=strategy)
            torch.testing.assert_close(got[name], ref, rtol=1e-9, atol=1e-12)  # keyed as given
        torch.testing.assert_close(
            channel_importance(wrapped, ["fc1"], batches, method="taylor")["fc1"],
            channel_importance(model, ["fc1"], batches, method="taylor")["fc1"],
        )


def test_dict_inputs():
    class KW(_MLP):
        def forward(self, x, scale=1.0):
            return super().forward(x * scale)

    model = KW().double().eval()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    got = channel_importance(model, ["fc2"], [({"x": x, "scale": 2.0}, y)])
    ref = naive_importance(model, ["fc2"], [(x * 2.0, y)])
    torch.testing.assert_close(got["fc2"], ref["fc2"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- Taylor ----
def test_taylor_equals_weight_gradient_formula(golden, build_arch):
    """Δ_j ≈ Σ ∂L/∂y_j·(b_j − y_j) at the output equals −Σ ∂L/∂W_j ⊙ W_j at the filter (conv with and without bias)."""
    case, model, batches = _golden_attention_setup(golden, build_arch)
    got = channel_importance(model, case["layers"], batches, method="taylor")
    ref = {n: torch.zeros(model.get_submodule(n).out_channels, dtype=torch.float64) for n in case["layers"]}
    for i, (x, y) in enumerate(batches):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in case["layers"]:
            w = model.get_submodule(n).weight
            ref[n] = (i * ref[n] - (w.grad * w).flatten(1).sum(1)) / (i + 1)
    model.zero_grad()
    for n in case["layers"]:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


def test_taylor_ranks_like_exact_and_frozen_params(golden, build_arch):
    from scipy.stats import spearmanr

    case, model, batches = _golden_attention_setup(golden, build_arch)
    exact = channel_importance(model, case["layers"], batches)
    for p in model.parameters():
        p.requires_grad_(False)  # Taylor works on a frozen model too
    taylor = channel_importance(model, case["layers"], batches, method="taylor")
    for n in case["layers"]:
        assert spearmanr(taylor[n].numpy(), exact[n].numpy()).statistic > 0.9


# ---------------------------------------------------------------- attention from importance ----
def test_attention_from_importance():
    w = torch.tensor([0.1, 0.4, -0.2, 0.3], dtype=torch.float64)
    z = (w - w.mean()) / w.std(correction=0)
    torch.testing.assert_close(attention_from_importance([w])[0], torch.softmax(z / 5, 0), **TOL)
    torch.testing.assert_close(
        attention_from_importance({"a": w}, temperature=2.0)["a"], torch.softmax(z / 2, 0), **TOL
    )
    # all channels alike: tllib divides 0 by 0 (NaN); finereg gives uniform weights
    torch.testing.assert_close(attention_from_importance([torch.zeros(4)])[0], torch.full((4,), 0.25).double())
    with pytest.raises(ValueError, match="temperature"):
        attention_from_importance([w], temperature=0)
    with pytest.raises(ValueError, match="1-D"):
        attention_from_importance([torch.zeros(2, 2)])


# ---------------------------------------------------------------- channel attention: bad input ----
def test_channel_attention_errors(golden, build_arch):
    case, model, batches = _golden_attention_setup(golden, build_arch)
    with pytest.raises(KeyError, match="did you mean"):
        channel_importance(model, ["33"], batches)
    with pytest.raises(TypeError, match="BatchNorm2d.*needs a layer with output channels"):
        channel_importance(model, ["1"], batches)
    with pytest.raises(ValueError, match="empty"):
        channel_importance(model, [], batches)
    with pytest.raises(ValueError, match="more than once"):
        channel_importance(model, ["0", "0"], batches)
    with pytest.raises(ValueError, match="method"):
        channel_importance(model, ["0"], batches, method="fast")
    with pytest.raises(ValueError, match="strategy"):
        channel_importance(model, ["0"], batches, strategy="fx")
    with pytest.raises(ValueError, match="chunk_size"):
        channel_importance(model, ["0"], batches, chunk_size=0)
    with pytest.raises(ValueError, match="no \\(inputs, labels\\) pairs"):
        channel_importance(model, ["0"], [])
    with pytest.raises(TypeError, match="\\(inputs, labels\\) pair"):
        channel_importance(model, ["0"], [batches[0][0]])
    with pytest.raises(TypeError, match="iterable of \\(inputs, labels\\)"):
        channel_importance(model, ["0"], batches[0][0])
    with pytest.raises(ValueError, match="scalar loss"):
        channel_importance(model, ["0"], batches, lambda o, y: F.cross_entropy(o, y, reduction="none"))
    model.train()
    with pytest.raises(ValueError, match="eval mode.*Modules in training mode"):
        channel_importance(model, ["0"], batches)
    with pytest.raises(ValueError, match="eval mode"):
        channel_importance(model, ["0"], batches, method="taylor")
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="eval mode.*\\['1'\\]"):  # any module in training mode
        channel_importance(model, ["0"], batches)


# ---------------------------------------------------------------- issue 9: silent results are errors ----
class _Unused(nn.Module):
    """conv ``b`` is a submodule the forward never calls; conv ``c`` runs but the output does not use it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.c(h)  # computed, thrown away
        return self.head(h.mean((2, 3)))


def _batches(n=3, nan_at=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, 6, 6, generator=g)
        if i == nan_at:
            x[1, 0, 0, 0] = float("nan")
        out.append((x, torch.randint(0, 3, (4,), generator=g)))
    return out


@pytest.mark.parametrize(
    "method, strategy", [("exact", "split"), ("exact", "hook"), ("exact", "auto"), ("taylor", "auto")]
)
def test_a_layer_the_forward_does_not_use_is_an_error(method, strategy):
    """issue 9 #8: the exact method returned uniform attention for a layer the forward never calls."""
    model = _Unused().eval()
    with pytest.raises(FineregError, match=r"layer\(s\) \['b'\] did not run in the model's forward"):
        channel_attention(model, ["a", "b"], _batches(), method=method, strategy=strategy)
    if strategy != "hook":  # a layer that runs but that the output ignores: the split graph (and Taylor) see it
        with pytest.raises(FineregError, match="does not depend on layer 'c'"):
            channel_attention(model, ["c"], _batches(), method=method, strategy=strategy)


@pytest.mark.parametrize("method", ["exact", "taylor"])
def test_non_finite_importance_fails_at_the_first_bad_batch(method):
    """issue 9 #8 and #27: a NaN loss gave uniform attention (exact) after every batch was processed; now the
    first batch with a non-finite loss stops the computation, naming it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    consumed = []

    def batches():
        for i, batch in enumerate(_batches(n=5, nan_at=1)):
            consumed.append(i)
            yield batch

    with pytest.raises(FineregError, match="batch 1 is nan"):
        channel_attention(model, ["0"], batches(), method=method)
    assert consumed == [0, 1]  # batches 2..4 were never computed
    with pytest.raises(FineregError, match="importance of layer 'x' has NaN or inf values"):
        attention_from_importance({"x": torch.tensor([0.1, float("nan"), 0.3])})


@pytest.mark.parametrize("method", ["exact", "taylor"])
def test_an_empty_batch_is_an_error(method):
    """issue 9 #16: a 0-sample batch raised ZeroDivisionError."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    empty = (torch.zeros(0, 3, 6, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(FineregError, match="batch 1 has no samples"):
        channel_attention(model, ["0"], [_batches(1)[0], empty], method=method)
