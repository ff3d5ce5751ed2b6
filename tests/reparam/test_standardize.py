"""Weight standardization: each variant equals its reference (the seed's module, timm's StdConv2d /
ScaledStdConv2d, an explicit per-output-unit loop) in outputs and gradients, for every layer layout; the eval
cache is reused and invalidated correctly; bake/export, freezing, torch.compile, bf16 autocast; errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from finereg.reparam.standardize import VARIANTS, WeightStandardization, bake, standardize

timm_layers = pytest.importorskip("timm.layers")
D = torch.float64
TOL = dict(rtol=1e-6, atol=1e-8)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# references
class SeedConv2d(nn.Conv2d):
    """The seed's (and the WS paper's) PyTorch module, verbatim in substance."""

    def forward(self, x):
        weight = self.weight
        weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        weight = weight - weight_mean
        std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        weight = weight / std.expand_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def unit_slices(module: nn.Module):
    """For each output unit o, the index selecting the weight entries that feed it (derived by hand)."""
    w = module.weight if not parametrize.is_parametrized(module) else module.parametrizations.weight.original
    if getattr(module, "transposed", False):
        g = module.groups
        in_g, out_g = w.shape[0] // g, w.shape[1]
        return [(slice(gi * in_g, (gi + 1) * in_g), j) for gi in range(g) for j in range(out_g)]
    return [(o,) for o in range(w.shape[0])]


def explicit_ws(w, slices, variant, eps=None, gain=None, gamma=1.0):
    """Ŵ by an explicit loop over output units, straight from the formulas (differentiable)."""
    eps = VARIANTS[variant] if eps is None else eps
    out = w * 0
    for o, sl in enumerate(slices):
        b = w[sl]
        n = b.numel()
        c = b - b.sum() / n
        if variant == "ws":
            val = c / (torch.sqrt((c * c).sum() / (n - 1)) + eps)
        else:
            val = c / torch.sqrt((c * c).sum() / n + eps)
            if variant == "scaled":
                val = val * gain[o] * gamma / math.sqrt(n)
        out[sl] = val
    return out


def grads(module, x, extra=()):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in extra]


def raw(module):
    return module.parametrizations.weight.original


LAYERS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    ("conv2d_g2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 7, 7)),
    ("conv2d_dw", lambda: nn.Conv2d(4, 4, 3, groups=4), (2, 4, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(3, 4, 2), (2, 3, 4, 4, 4)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3), (2, 4, 5)),
    ("convT2d_g2", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), (2, 4, 4, 4)),
    ("convT3d_g3", lambda: nn.ConvTranspose3d(6, 3, 2, groups=3), (2, 6, 3, 3, 3)),
    ("linear", lambda: nn.Linear(5, 4), (3, 5)),
]


# ---------------------------------------------------------------------------------------------------------
# variants equal their references
@pytest.mark.parametrize("groups", [1, 2])
def test_ws_equals_seed_module(groups):
    seed = SeedConv2d(4, 6, 3, padding=1, groups=groups).double()
    ours = copy.deepcopy(nn.Conv2d(4, 6, 3, padding=1, groups=groups).double())
    ours.load_state_dict(seed.state_dict())
    standardize(ours, "ws")
    x = torch.randn(2, 4, 6, 6, dtype=D)
    y0, gx0, (gw0, gb0) = grads(seed, x, (seed.weight, seed.bias))
    y1, gx1, (gw1, gb1) = grads(ours, x, (raw(ours), ours.bias))
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gw1, gw0, **TOL)
    torch.testing.assert_close(gb1, gb0, **TOL)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bit_equals_timm_stdconv2d(groups):
    ref = timm_layers.StdConv2d(4, 8, 3, groups=groups).double()
    ours = nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=False).double()
    ours.load_state_dict(ref.state_dict())
    standardize(ours, "bit")
    assert raw(ours) is not None and ours.parametrizations.weight[0].eps == ref.eps  # same default eps
    x = torch.randn(2, 4, 6, 6, dtype=D)
    y0, gx0, (gw0,) = grads(ref, x, (ref.weight,))
    y1, gx1, (gw1,) = grads(ours, x, (raw(ours),))
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gw1, gw0, **TOL)


@pytest.mark.parametrize("gamma", [1.0, 1.7139])
def test_scaled_equals_timm_scaledstdconv2d(gamma):
    ref = timm_layers.ScaledStdConv2d(4, 6, 3, gamma=gamma).double()
    with torch.no_grad():
        ref.gain.copy_(torch.rand_like(ref.gain) + 0.5)
    ours = nn.Conv2d(4, 6, 3, padding=1).double()
    ours.load_state_dict({"weight": ref.weight, "bias": ref.bias})
    standardize(ours, "scaled", gamma=gamma)
    ws = ours.parametrizations.weight[0]
    assert ws.eps == ref.eps and ws.scale == pytest.approx(ref.scale, rel=1e-15)
    fresh = timm_layers.ScaledStdConv2d(4, 6, 3)
    torch.testing.assert_close(WeightStandardization((6, 4, 3, 3), "scaled").gain, fresh.gain.view(-1))  # gain init
    with torch.no_grad():
        ws.gain.copy_(ref.gain.view(-1))
    x = torch.randn(2, 4, 6, 6, dtype=D)
    y0, gx0, (gw0, gg0, gb0) = grads(ref, x, (ref.weight, ref.gain, ref.bias))
    y1, gx1, (gw1, gg1, gb1) = grads(ours, x, (raw(ours), ws.gain, ours.bias))
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gw1, gw0, **TOL)
    torch.testing.assert_close(gg1, gg0.view(-1), **TOL)
    torch.testing.assert_close(gb1, gb0, **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_every_layout_equals_explicit_loop(variant, name, make, shape):
    """Values and gradients equal autograd through the explicit per-output-unit formula (ConvTranspose: the
    entries W[g·in_g:(g+1)·in_g, j] feed output channel g·out/groups + j)."""
    module = make().double()
    plain = copy.deepcopy(module)
    standardize(module, variant, linear=True, gamma=1.3)
    ws = module.parametrizations.weight[0]
    if ws.gain is not None:
        with torch.no_grad():
            ws.gain.copy_(torch.rand_like(ws.gain) + 0.5)
    x = torch.randn(*shape, dtype=D)
    extra = [raw(module)] + ([ws.gain] if ws.gain is not None else [])
    y1, gx1, g1 = grads(module, x, extra)

    leaf = raw(module).detach().clone().requires_grad_(True)
    gain = ws.gain.detach().clone().requires_grad_(True) if ws.gain is not None else None
    w_hat = explicit_ws(leaf, unit_slices(module), variant, gain=gain, gamma=1.3)
    torch.testing.assert_close(module.weight, w_hat, **TOL)
    fn = torch.func.functional_call
    xr = x.clone().requires_grad_(True)
    y0 = fn(plain, {"weight": w_hat, "bias": plain.bias}, (xr,))
    (y0 * torch.linspace(-1, 2, y0.numel(), dtype=D).reshape(y0.shape)).sum().backward()
    torch.testing.assert_close(y1, y0.detach(), **TOL)
    torch.testing.assert_close(gx1, xr.grad, **TOL)
    torch.testing.assert_close(g1[0], leaf.grad, **TOL)
    if gain is not None:
        torch.testing.assert_close(g1[1], gain.grad, **TOL)
    # WS is invariant to shifting a unit's raw weights, so each unit's raw gradient sums to zero
    unit_sums = torch.stack([g1[0][sl].sum() for sl in unit_slices(module)])
    assert unit_sums.abs().max() < 1e-10 * (1 + g1[0].abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,make,shape", [LAYERS[1], LAYERS[4], LAYERS[7]], ids=["conv2d", "convT1d", "linear"])
def test_fused_equals_plain_ops_including_higher_order_gradients(variant, name, make, shape):
    """The fused autograd function (BatchNorm's backward kernel with matched per-unit factors) equals the plain
    differentiable ops, also on a constant unit (σ = 0), and for higher-order gradients."""
    fused = make().double()
    with torch.no_grad():
        fused.weight[0] = 0.25  # a constant output unit
    plain = copy.deepcopy(fused)
    standardize(fused, variant, linear=True)
    standardize(plain, variant, linear=True)
    plain.parametrizations.weight[0].fused = False
    for m in (fused, plain):
        if m.parametrizations.weight[0].gain is not None:
            with torch.no_grad():
                m.parametrizations.weight[0].gain.copy_(
                    torch.linspace(0.5, 2, m.parametrizations.weight[0].gain.numel())
                )
    x = torch.randn(*shape, dtype=D)
    extra = lambda m: [raw(m)] + [p for p in m.parametrizations.weight.parameters() if p is not raw(m)]  # noqa: E731
    y0, gx0, g0 = grads(plain, x, extra(plain))
    y1, gx1, g1 = grads(fused, x, extra(fused))
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    assert len(g1) == len(g0) == (2 if variant == "scaled" else 1)
    for a, b in zip(g1, g0):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL)

    # second order (create_graph=True): the fused backward falls back to plain ops; both equal finite
    # differences of the gradient. The loss mixes second- and first-order terms.
    with torch.no_grad():  # smooth point: no constant unit
        for m in (plain, fused):
            raw(m).copy_(torch.linspace(-1, 1.3, raw(m).numel(), dtype=D).reshape(raw(m).shape) ** 3)
    vec = torch.randn_like(raw(plain))
    xg = x.clone().requires_grad_(True)

    def weight_grad(m):
        (g,) = torch.autograd.grad(m(xg).square().sum(), raw(m), create_graph=True)
        return g

    def objective(m):
        return (weight_grad(m) * vec).sum() + m(xg).sum()

    (hvp,) = torch.autograd.grad(objective(plain), raw(plain))
    (hvp_fused,) = torch.autograd.grad(objective(fused), raw(fused))
    h = 1e-6
    with torch.no_grad():
        raw(plain).add_(h * vec)
    up = weight_grad(plain).detach()
    with torch.no_grad():
        raw(plain).sub_(2 * h * vec)
    down = weight_grad(plain).detach()
    with torch.no_grad():
        raw(plain).add_(h * vec)
    (first,) = torch.autograd.grad(plain(xg).sum(), raw(plain))
    torch.testing.assert_close(hvp, (up - down) / (2 * h) + first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hvp_fused, hvp, **TOL)
    # input-gradient penalty (WGAN-GP style): double backward through the conv, first order through WS
    (gx,) = torch.autograd.grad(fused(xg).square().sum(), xg, create_graph=True)
    (gpen,) = torch.autograd.grad(gx.square().sum(), raw(fused))
    (gx,) = torch.autograd.grad(plain(xg).square().sum(), xg, create_graph=True)
    torch.testing.assert_close(gpen, torch.autograd.grad(gx.square().sum(), raw(plain))[0], **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channels_last_weights(variant):
    conv = nn.Conv2d(4, 6, 3).double()
    ref = copy.deepcopy(conv)
    conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    standardize(conv, variant)
    standardize(ref, variant)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    y0, gx0, (gw0,) = grads(ref, x, (raw(ref),))
    y1, gx1, (gw1,) = grads(conv, x, (raw(conv),))
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gw1, gw0, **TOL)


def test_standardized_units_have_zero_mean_unit_std():
    conv = nn.ConvTranspose2d(6, 4, 3, groups=2).double()
    standardize(conv, "bit", eps=1e-300)
    w = conv.weight.detach()
    for sl in unit_slices(conv):
        assert abs(float(w[sl].mean())) < 1e-12
        assert float(w[sl].var(unbiased=False)) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# the seed's first attempt is wrong; ours is right
class SeedBNNet(nn.Module):
    """The seed's first attempt: BatchNorm applied to ``weight.data`` inside forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, 5, 1)
        self.conv1_bn = nn.BatchNorm2d(1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        self.conv1.weight.data = self.conv1_bn(self.conv1.weight.data)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        return self.fc(x.flatten(1))


class OursNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, 5, 1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        return self.fc(x.flatten(1))


def test_seed_batchnorm_on_weight_data_is_wrong_and_ours_is_right():
    seed = SeedBNNet().double()
    ours = OursNet().double()
    ours.load_state_dict({k: v for k, v in seed.state_dict().items() if not k.startswith("conv1_bn")})
    w0 = seed.conv1.weight.detach().clone()
    standardize(ours, "bit", eps=1e-5)  # BatchNorm2d's biased variance and eps 1e-5
    x, t = torch.randn(4, 1, 12, 12, dtype=D), torch.tensor([0, 1, 2, 1])

    F.cross_entropy(seed(x), t).backward()
    F.cross_entropy(ours(x), t).backward()

    # the forward pass itself overwrote the seed's raw weight; ours is untouched
    assert not torch.equal(seed.conv1.weight.detach(), w0)
    assert torch.equal(raw(ours.conv1).detach(), w0)
    # seed normalizes per *input* channel over (out, k, k); that is not per output channel
    seed_means = seed.conv1.weight.detach().flatten(1).mean(1)
    assert seed_means.abs().max() > 1e-3
    assert ours.conv1.weight.detach().flatten(1).mean(1).abs().max() < 1e-12

    # our gradient equals autograd through the explicit formula
    leaf = w0.clone().requires_grad_(True)
    w_hat = explicit_ws(leaf, [(o,) for o in range(5)], "bit", eps=1e-5)
    y = F.conv2d(x, w_hat, ours.conv1.bias)
    F.cross_entropy(ours.fc(F.max_pool2d(F.relu(y), 2, 2).flatten(1)), t).backward()
    torch.testing.assert_close(raw(ours.conv1).grad, leaf.grad, **TOL)
    # the seed's gradient is dL/dŴ without the standardization's Jacobian: different, non-zero row sums
    assert (seed.conv1.weight.grad - leaf.grad).abs().max() > 1e-3
    assert seed.conv1.weight.grad.flatten(1).sum(1).abs().max() > 1e-6
    assert raw(ours.conv1).grad.flatten(1).sum(1).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------------------
# eval-mode cache
def counting(module):
    ws = module.parametrizations.weight[0]
    calls = []
    original = ws.standardized

    def counted(w):
        calls.append(1)
        return original(w)

    ws.standardized = counted
    return calls


def test_eval_cache_computes_once_and_reuses():
    conv = nn.Conv2d(3, 4, 3).double()
    standardize(conv, "scaled")
    calls = counting(conv)
    conv.eval()
    x = torch.randn(1, 3, 5, 5, dtype=D)
    with torch.no_grad():
        y1 = conv(x)
        w1 = conv.weight
        y2 = conv(x)
        assert conv.weight is w1
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.inference_mode():
        conv(x)
        conv(x)
    assert len(calls) == 1
    conv.train()
    assert conv.parametrizations.weight[0]._cache is None
    conv(x)
    conv(x)
    assert len(calls) == 3  # training: every forward recomputes


def test_eval_cache_invalidated_by_every_kind_of_weight_change():
    conv = nn.Conv2d(3, 4, 3).double()
    standardize(conv, "scaled")
    conv.eval()
    ws = conv.parametrizations.weight[0]

    def fresh_value():
        return ws.standardized(raw(conv)).detach()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(conv.weight, fresh_value(), rtol=0, atol=0)

    check()
    other = copy.deepcopy(conv)
    with torch.no_grad():
        other.parametrizations.weight.original.mul_(-2).add_(1)
        other.parametrizations.weight[0].gain.fill_(3.0)
    conv.load_state_dict(other.state_dict())  # copy_ in place: version counters
    check()
    torch.testing.assert_close(conv.weight, other.parametrizations.weight[0].standardized(raw(other)).detach())
    with torch.no_grad():
        raw(conv)[0, 0, 0, 0] += 1.0  # in-place edit of one entry
    check()
    with torch.no_grad():
        ws.gain[1] = 5.0  # the gain is a source too
    check()
    raw(conv).data = torch.randn(4, 3, 3, 3, dtype=D)  # .data swap keeps the version, changes the storage
    check()
    conv.float()  # dtype change
    assert conv.weight.dtype == torch.float32
    check()


def test_eval_with_gradients_recomputes_and_trains_correctly():
    """Fine-tuning in eval mode (frozen BN statistics): gradients must be exact and repeatable."""
    conv = nn.Conv2d(3, 4, 3).double()
    standardize(conv, "ws")
    ref = copy.deepcopy(conv)
    conv.eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    with torch.no_grad():
        conv(x)  # fills the cache
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for m, o in ((conv, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    torch.testing.assert_close(raw(conv), raw(ref), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref(x), **TOL)  # cache refilled with the trained weight


def test_cache_from_inference_mode_is_not_reused_where_autograd_needs_it():
    conv = nn.Conv2d(3, 4, 3).double().requires_grad_(False)
    standardize(conv, "bit")
    conv.eval()
    x = torch.randn(1, 3, 5, 5, dtype=D)
    with torch.inference_mode():
        conv(x)
    xg = x.clone().requires_grad_(True)
    conv(xg).sum().backward()  # would fail if the inference tensor were saved for backward
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_cache_not_copied():
    """deepcopy (parametrized modules are not picklable; state_dict never holds the cache) drops the cache."""
    conv = nn.Conv2d(3, 4, 3)
    standardize(conv, "ws")
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 3, 5, 5))
    assert conv.parametrizations.weight[0]._cache is not None
    assert not any("cache" in k for k in conv.state_dict())
    clone = copy.deepcopy(conv)
    assert clone.parametrizations.weight[0]._cache is None
    with torch.no_grad():
        torch.testing.assert_close(clone.weight, conv.weight)


# ---------------------------------------------------------------------------------------------------------
# whole models, report, errors
def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.Conv2d(4, 4, 1, groups=4),  # depthwise 1x1: fan-in 1
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def test_standardize_model_report_and_selection():
    model = small_net()
    report = standardize(model, "bit")
    assert report.names == ["0", "3.0", "3.1", "4"]
    assert report.skipped == [("5", "fan-in 1 < 2")]
    text = str(report)
    assert "3.0" in text and "ConvTranspose2d" in text and "fan-in 1" in text
    assert not parametrize.is_parametrized(model[8])
    with pytest.warns(UserWarning, match="changed nothing"):
        again = standardize(model, "ws")
    assert len(again) == 0 and all("already standardized ('bit')" in r for _, r in again.skipped[:4])

    model = small_net()
    report = standardize(model, "ws", include=["3.*", "8"], exclude="3.0", linear=True)
    assert report.names == ["3.1", "8"]
    assert parametrize.is_parametrized(model[8]) and not parametrize.is_parametrized(model[3][0])


def test_standardize_whole_torchvision_resnet_trains():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=3)
    report = standardize(model, "ws")
    assert len(report) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "layer1.0.conv1.parametrizations.weight.original" in changed


def test_timm_model_and_parametrize_cached_context():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).double()
    report = standardize(model, "bit", exclude="conv1.*")
    assert len(report) == sum(isinstance(m, nn.Conv2d) for n, m in model.named_modules() if not n.startswith("conv1."))
    x = torch.randn(2, 3, 32, 32, dtype=D)
    y = model(x)
    with parametrize.cached():  # parametrize's own cache (our fast weight getter steps aside)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    y.sum().backward()
    assert model.layer1[0].conv1.parametrizations.weight.original.grad is not None


def test_skips_timm_stdconv_and_accepts_wrapped_models():
    model = nn.Sequential(timm_layers.StdConv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    report = standardize(torch.compile(model), "ws")  # unwraps torch.compile's wrapper
    assert report.names == ["1"] and "StdConv2d already standardizes" in report.skipped[0][1]


def test_scaled_gain_is_registered_and_trained():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    standardize(model, "scaled", gain_init=0.5)
    names = dict(model.named_parameters())
    assert "0.parametrizations.weight.0.gain" in names
    gain = names["2.parametrizations.weight.0.gain"]
    assert torch.equal(gain, torch.full((2,), 0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 7, 7)).square().sum().backward()
    opt.step()
    assert not torch.equal(gain.detach(), torch.full((2,), 0.5))
    state = model.state_dict()
    clone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    standardize(clone, "scaled")
    clone.load_state_dict(state)
    x = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(clone(x), model(x))


def test_errors():
    model = small_net()
    with pytest.raises(ValueError, match="variant must be one of 'ws', 'bit', 'scaled', got 'nf'"):
        standardize(model, "nf")
    with pytest.raises(KeyError, match=r"include pattern '3\.2' matches no module.*did you mean.*'3\.1'"):
        standardize(model, include="3.2")
    with pytest.raises(KeyError, match=r"exclude pattern 'conv9' matches no module"):
        standardize(model, exclude="conv9")
    with pytest.raises(ValueError, match=r"'8' \(Linear\) but no convolution.*linear=True"):
        standardize(model, include="8")
    with pytest.raises(ValueError, match="'1' \\(GroupNorm\\) but no convolution"):
        standardize(model, include="1")
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        standardize(model, include=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        standardize("resnet")
    with pytest.raises(ValueError, match=r"eps \(it keeps a constant unit finite\) must be a finite number > 0"):
        standardize(model, eps=0.0)
    with pytest.raises(ValueError, match="lazy module.*run one forward pass"):
        standardize(nn.Sequential(nn.LazyConv2d(4, 3)))
    with pytest.raises(ValueError, match="fan-in of 1.*exclude this layer"):
        WeightStandardization((4, 1, 1, 1))
    with pytest.raises(ValueError, match="≥ 2 dims"):
        WeightStandardization((4,))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing half-done


# ---------------------------------------------------------------------------------------------------------
# bake, export, freezing, compile, autocast
def test_bake_keeps_outputs_and_exports():
    model = small_net()
    standardize(model, "scaled", linear=True)
    with torch.no_grad():
        model[0].parametrizations.weight[0].gain.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    model.eval()
    with torch.no_grad():
        y = model(x)
    weight_obj = raw(model[0])
    report = bake(model)
    assert report.names == ["0", "3.0", "3.1", "4", "8"]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model[0].weight is weight_obj  # same Parameter object, now holding Ŵ
    assert all("gain" not in k and "parametrizations" not in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), y, **TOL)
    assert len(bake(model)) == 0
    plain = small_net().eval()  # a baked state_dict loads into the unconverted architecture
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y, rtol=0, atol=0)


def test_bake_a_deep_copy_leaves_the_original_working():
    """parametrize shares the parametrized class between a module and its deepcopy; bake must not edit it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)).double()
    standardize(model, "ws")
    x = torch.randn(1, 3, 5, 5, dtype=D)
    y = model(x).detach()
    for _ in range(2):
        exported = copy.deepcopy(model)
        bake(exported)
        torch.testing.assert_close(exported(x).detach(), y, **TOL)
        assert parametrize.is_parametrized(model[0]) and type(model[0]).__name__ == "ParametrizedConv2d"
        torch.testing.assert_close(model(x).detach(), y, rtol=0, atol=0)
    # standardizing a deep copy of a module with another parametrized tensor leaves the original alone
    conv = nn.Conv2d(3, 4, 3).double()
    parametrize.register_parametrization(conv, "bias", nn.Identity())
    twin = copy.deepcopy(conv)
    standardize(twin, "bit")
    torch.testing.assert_close(conv.weight, conv._parameters["weight"], rtol=0, atol=0)  # still plain
    assert not parametrize.is_parametrized(conv, "weight") and parametrize.is_parametrized(twin, "weight")


def test_bake_in_train_mode_equals_forward():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    standardize(conv, "ws")
    x = torch.randn(1, 4, 4, 4, dtype=D)
    y = conv(x).detach()
    bake(conv)
    torch.testing.assert_close(conv(x).detach(), y, rtol=0, atol=0)


def test_composes_with_partial_freezing():
    freeze_mod = pytest.importorskip("finereg.reparam.freeze")
    x = torch.randn(4, 3, 6, 6, dtype=D)

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    # freeze the raw weight, then standardize: frozen raw entries are bit-identical, Ŵ is computed from them
    conv = nn.Conv2d(3, 4, 3).double()
    mask = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    mask[0] = True
    mask[1, 0, 0, 0] = True
    frozen_values = conv.weight.detach().clone()
    freeze_mod.freeze(conv, "weight", mask)
    standardize(conv, "ws")
    unit0 = conv.weight.detach()[0].clone()
    train(conv)
    plist = conv.parametrizations.weight
    assert [type(p).__name__ for p in plist] == ["PartialFreeze", "WeightStandardization"]
    stage = plist[0](plist.original).detach()
    assert torch.equal(stage[mask], frozen_values[mask])
    assert not torch.equal(stage[~mask], frozen_values[~mask])  # the rest trained
    torch.testing.assert_close(conv.weight.detach(), explicit_ws(stage, unit_slices(conv), "ws"), **TOL)
    assert torch.equal(conv.weight.detach()[0], unit0)  # a wholly frozen unit keeps its Ŵ exactly

    # standardize, then freeze: frozen entries of the effective Ŵ are bit-identical
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    standardize(conv, "bit")
    w_hat0 = conv.weight.detach().clone()
    freeze_mod.freeze(conv, "weight", [1, 4])
    train_x = torch.randn(2, 4, 5, 5, dtype=D)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        conv(train_x).square().mean().backward()
        opt.step()
    w_hat = conv.weight.detach()
    assert torch.equal(w_hat[:, 1], w_hat0[:, 1])  # units 1 and 4 = (group 0, j=1) and (group 1, j=1)
    assert not torch.equal(w_hat[:, 0], w_hat0[:, 0])
    report = bake(conv)
    assert "PartialFreeze" in report.changed[0][1] and not parametrize.is_parametrized(conv)
    torch.testing.assert_close(conv.weight.detach(), w_hat, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["ws", "scaled"])
def test_torch_compile_matches_eager(variant):
    """aot_eager backend (inductor's C++ compile is too slow for the test budget); same graph capture."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, groups=2))
    standardize(model, variant)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-6)


class DtypeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in (
            "mean",
            "sum",
            "linalg_vector_norm",
            "std_mean",
            "var_mean",
            "native_batch_norm",
            "_native_batch_norm_legit",
            "_batch_norm_with_update",
            "native_batch_norm_backward",
        ):
            self.seen.append((name, args[0].dtype))  # every reduction of the standardization and its backward
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_statistics_in_float32(variant):
    conv = nn.Conv2d(8, 16, 3)
    standardize(conv, variant)
    x = torch.randn(2, 8, 6, 6)
    ws = conv.parametrizations.weight[0]
    ref = explicit_ws(
        raw(conv).detach().double(),
        unit_slices(conv),
        variant,
        gain=None if ws.gain is None else ws.gain.detach().double(),
    )
    log = DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        w_hat = conv.weight
        y = conv(x)
    assert y.dtype == torch.bfloat16
    assert log.seen and all(dt == torch.float32 for _, dt in log.seen), log.seen
    assert w_hat.dtype == torch.float32
    torch.testing.assert_close(w_hat.double(), ref, rtol=1e-5, atol=1e-6)  # bf16 maths would miss by ~1e-2

    conv.to(torch.bfloat16)  # bf16 parameters: computed in float32, rounded once
    log = DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        w_hat = conv.weight
        conv(x.bfloat16()).float().sum().backward()
    assert all(dt == torch.float32 for _, dt in log.seen) and "native_batch_norm_backward" in dict(log.seen)
    ref = explicit_ws(
        raw(conv).detach().double(),
        unit_slices(conv),
        variant,
        gain=None if ws.gain is None else ws.gain.detach().double(),
    )
    # rounded once from float32: within half a bf16 ulp (≤ 2⁻⁸ relative) of the exact value
    assert w_hat.dtype == torch.bfloat16
    assert ((w_hat.double() - ref).abs() <= ref.abs() * 2.0**-8 * 1.001 + 1e-30).all()
    assert raw(conv).grad.dtype == torch.bfloat16 and torch.isfinite(raw(conv).grad.float()).all()


def test_the_aten_op_of_the_fused_backward_keeps_its_signature():
    """The fused backward calls ``aten.native_batch_norm_backward`` positionally; if torch changes its schema, this
    fails loudly (and the numerical tests above would show wrong gradients) instead of a silent misuse."""
    schema = str(torch.ops.aten.native_batch_norm_backward.default._schema)
    assert schema == (
        "aten::native_batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? running_mean, "
        "Tensor? running_var, Tensor? save_mean, Tensor? save_invstd, bool train, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)"
    ), f"torch changed aten.native_batch_norm_backward; update _FusedStandardize.backward: {schema}"


def test_nothing_to_convert_warns_or_raises_with_strict():
    """issue 9 #11: standardize / batchnorm_to_groupnorm on a model with nothing to convert did nothing silently."""
    from finereg._checks import FineregError, FineregWarning
    from finereg.reparam.norm import batchnorm_to_groupnorm

    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(FineregWarning, match=r"weight standardization \('ws'\) changed nothing: no convolution"):
        assert len(standardize(mlp)) == 0
    with pytest.raises(FineregError, match="changed nothing.*linear=True"):
        standardize(mlp, strict=True)
    assert len(standardize(mlp, linear=True, strict=True)) == 2
    with pytest.warns(FineregWarning, match=r"changed nothing.*2 skipped: already standardized"):
        standardize(mlp, linear=True)  # everything skipped
    with pytest.warns(FineregWarning, match="BatchNorm -> GroupNorm changed nothing: no BatchNorm layer"):
        batchnorm_to_groupnorm(mlp)
    with pytest.raises(FineregError, match="changed nothing"):
        batchnorm_to_groupnorm(mlp, strict=True)
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=4))  # fan-in 3, then fan-in 1
    report = standardize(conv, strict=True)
    assert report.names == ["0"] and report.skipped == [("1", "fan-in 1 < 2")]
