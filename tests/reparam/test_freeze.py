"""Exact partial freezing: frozen entries bit-identical under every optimizer; trainable entries get exactly
the update of an independently built reference; state_dict, unfreeze, composition, errors."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from finereg.compat.keras import OrthogonalRegularizer
from finereg.reparam.freeze import PartialFreeze, freeze, frozen_mask, unfreeze
from finereg.weight.groups import WeightGroup, matrix_view
from finereg.weight.orthogonal import Orthogonality

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).double()


def batches(n=12):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 6, 6, generator=g, dtype=D), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def optimizer_cases():
    base = [
        ("sgd_momentum_wd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
        ("sgd_nesterov_wd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
        ("sgd_dampening", torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3)),
        ("adam_wd", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
        ("adam_amsgrad", torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5)),
        (
            "rmsprop_momentum_centered_wd",
            torch.optim.RMSprop,
            dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1),
        ),
        ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9)),
    ]
    out = []
    for name, cls, kw in base:
        impls = {"forloop": dict(foreach=False), "foreach": dict(foreach=True)}
        if cls is not torch.optim.RMSprop:  # RMSprop has no fused form in torch
            impls["fused"] = dict(fused=True)
        for impl, extra in impls.items():
            out.append(pytest.param(cls, {**kw, **extra}, id=f"{name}-{impl}"))
    return out


@pytest.mark.parametrize("opt_cls, kwargs", optimizer_cases())
def test_frozen_entries_never_move_and_trainable_entries_match_a_reference(opt_cls, kwargs):
    """A: our freeze. B: an independent construction (the trainable entries as their own parameter, the
    frozen ones as a constant, weight = constant.masked_scatter(trainable_mask, p)) — what the seed's
    "one layer per filter" workaround does, generalised to any mask. Same data, same optimizer settings."""
    a = net()
    conv_mask = torch.rand(a[0].weight.shape) < 0.4  # an arbitrary element mask
    lin_units = [0, 3]  # whole output units of the Linear layer
    freeze(a[0], "weight", conv_mask)
    freeze(a, "3.weight", lin_units)
    lin_mask = frozen_mask(a[3])
    assert lin_mask[[0, 3]].all() and not lin_mask[[1, 2, 4]].any()

    ref = net()  # same initial values
    init = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    consts = {"0": init["0.weight"], "3": init["3.weight"]}
    masks = {"0": conv_mask, "3": lin_mask}
    p_train = {k: nn.Parameter(consts[k][~masks[k]].clone()) for k in consts}

    def ref_forward(x):
        w0 = consts["0"].masked_scatter(~masks["0"], p_train["0"])
        w3 = consts["3"].masked_scatter(~masks["3"], p_train["3"])
        h = F.relu(F.conv2d(x, w0, ref[0].bias)).flatten(1)
        return F.linear(h, w3, ref[3].bias)

    opt_a = opt_cls(a.parameters(), **kwargs)
    opt_b = opt_cls([p_train["0"], ref[0].bias, p_train["3"], ref[3].bias], **kwargs)
    for x, y in batches():
        for model_out, opt in ((lambda x=x: a(x), opt_a), (lambda x=x: ref_forward(x), opt_b)):
            opt.zero_grad()
            F.cross_entropy(model_out(), y).backward()
            opt.step()
        w0, w3 = a[0].weight, a[3].weight
        assert torch.equal(w0[conv_mask], init["0.weight"][conv_mask])  # bit-identical
        assert torch.equal(w3[lin_mask], init["3.weight"][lin_mask])
        if kwargs.get("fused"):
            # fused CPU kernels vectorise by position (SIMD body vs scalar tail) and B's tensors are
            # laid out differently, so the last bit may differ; the update is the same to 1e-12
            torch.testing.assert_close(w0[~conv_mask], p_train["0"].detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(w3[~lin_mask], p_train["3"].detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(a[0].bias, ref[0].bias, rtol=0, atol=1e-12)
        else:  # for-loop and foreach: bit-for-bit the reference's update
            assert torch.equal(w0[~conv_mask], p_train["0"].detach())
            assert torch.equal(w3[~lin_mask], p_train["3"].detach())
            assert torch.equal(a[0].bias, ref[0].bias)
    assert not torch.equal(w0[~conv_mask], init["0.weight"][~conv_mask])  # training did happen
    if kwargs.get("weight_decay"):
        # the optimizer did move the frozen entries of the underlying tensor; the weight never showed it
        orig = a[0].parametrizations.weight.original
        assert not torch.equal(orig[conv_mask], init["0.weight"][conv_mask])


def test_usual_answers_do_not_freeze():
    """Why a parametrization: requires_grad on a slice does nothing; a grad hook loses to weight decay and
    momentum."""
    lin = nn.Linear(4, 3)
    lin.weight.data[0].requires_grad = False  # a flag on a temporary view
    assert lin.weight.requires_grad
    before = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    lin.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), 0.0))  # zero row 0's gradient
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(8, 4)).square().sum().backward()
        assert torch.all(lin.weight.grad[0] == 0)  # the hook worked...
        opt.step()
    assert not torch.equal(lin.weight[0], before[0])  # ...and row 0 moved anyway (weight decay, momentum)

    lin2 = nn.Linear(4, 3)
    before2 = lin2.weight.detach().clone()
    freeze(lin2, "weight", [0])
    opt2 = torch.optim.SGD(lin2.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt2.zero_grad()
        lin2(torch.randn(8, 4)).square().sum().backward()
        opt2.step()
    assert torch.equal(lin2.weight[0], before2[0])
    assert not torch.equal(lin2.weight[1:], before2[1:])


def test_gradient_is_exact():
    a, b = net(), net()
    mask = torch.rand(a[0].weight.shape) < 0.5
    freeze(a[0], "weight", mask)
    x, y = batches(1)[0]
    F.cross_entropy(a(x), y).backward()
    F.cross_entropy(b(x), y).backward()
    g = a[0].parametrizations.weight.original.grad
    assert torch.equal(g[mask], torch.zeros_like(g[mask]))
    assert torch.equal(g[~mask], b[0].weight.grad[~mask])


def test_optimizer_built_before_freeze_keeps_working():
    lin = nn.Linear(5, 4)
    param = lin.weight
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    freeze(lin, "weight", [1, -1])
    assert lin.parametrizations.weight.original is param
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(6, 5)).sum().backward()
        opt.step()
    assert torch.equal(lin.weight[[1, 3]], before[[1, 3]])
    assert not torch.equal(lin.weight[[0, 2]], before[[0, 2]])


def train(model, steps=4, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, **kw)
    for x, y in batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip():
    a = net()
    start = a[0].weight.detach().clone()
    freeze(a[0], "weight", [1, 4])
    train(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    assert {"0.parametrizations.weight.0.mask", "0.parametrizations.weight.0.values"} <= set(a.state_dict())

    b = net()
    freeze(b[0], "weight", [])  # same structure, nothing frozen yet: load_state_dict brings mask and values
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(frozen_mask(b[0]), frozen_mask(a[0]))
    assert torch.equal(b[0].weight, a[0].weight)
    train(b)
    assert torch.equal(b[0].weight[[1, 4]], start[[1, 4]])
    c = copy.deepcopy(b)
    assert torch.equal(c[0].weight, b[0].weight)


def test_unfreeze_keeps_the_effective_weight_as_the_same_parameter():
    lin = nn.Linear(5, 4)
    param = lin.weight
    freeze(lin, "weight", [0, 2])
    train_lin(lin)
    effective = lin.weight.detach().clone()
    unfreeze(lin, "weight")
    assert not parametrize.is_parametrized(lin)
    assert lin.weight is param and isinstance(lin.weight, nn.Parameter)
    assert torch.equal(lin.weight, effective)
    assert frozen_mask(lin) is None
    train_lin(lin)
    assert not torch.equal(lin.weight[0], effective[0])  # trainable again


def train_lin(lin, steps=3):
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        lin(torch.randn(6, lin.in_features)).square().sum().backward()
        opt.step()


def test_freezing_again_extends_the_frozen_set():
    lin = nn.Linear(5, 4)
    start = lin.weight.detach().clone()
    freeze(lin, "weight", [0])
    train_lin(lin)
    mid = lin.weight.detach().clone()
    freeze(lin, "weight", [2])
    assert len(lin.parametrizations.weight) == 1
    train_lin(lin)
    assert torch.equal(lin.weight[0], start[0])
    assert torch.equal(lin.weight[2], mid[2])
    assert not torch.equal(lin.weight[1], mid[1])


def test_conv_transpose_units_are_output_channels():
    ct = nn.ConvTranspose2d(4, 6, 2, groups=2)  # weight (4, 3, 2, 2)
    freeze(ct, "weight", [4])  # group 1, j = 1 -> input channels 2..3, slice 1
    mask = frozen_mask(ct)
    expected = torch.zeros_like(mask)
    expected[2:4, 1] = True
    assert torch.equal(mask, expected)
    assert matrix_view(mask, ct).all(1).tolist() == [o == 4 for o in range(6)]
    freeze(ct, "bias", [0])  # 1-D tensors: plain indices
    assert frozen_mask(ct, "bias").tolist() == [True] + [False] * 5


class Standardize(nn.Module):
    """A plain per-output-unit standardization: any user parametrization, not only finereg's own."""

    def forward(self, w):
        flat = w.flatten(1)
        return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).reshape(w.shape)


class Scale(nn.Module):
    def forward(self, w):
        return 3 * w

    def right_inverse(self, w):
        return w / 3


def test_compose_freeze_after_another_parametrization():
    a = net()
    parametrize.register_parametrization(a[0], "weight", Standardize())
    mask = torch.rand(a[0].weight.shape) < 0.5  # element mask on the *effective* weight
    freeze(a[0], "weight", mask)
    start = a[0].weight.detach().clone()
    train(a, steps=5)
    assert torch.equal(a[0].weight[mask], start[mask])
    assert not torch.equal(a[0].weight[~mask], start[~mask])
    with pytest.raises(ValueError, match="right_inverse"):
        unfreeze(a[0], "weight")


def test_compose_freeze_before_another_parametrization_whole_units():
    a = net()
    start_raw = a[0].weight.detach().clone()
    freeze(a[0], "weight", [0, 5])
    parametrize.register_parametrization(a[0], "weight", Standardize())
    start = a[0].weight.detach().clone()
    train(a, steps=5)
    assert torch.equal(a[0].weight[[0, 5]], start[[0, 5]])  # whole frozen units: effective weight fixed
    assert torch.equal(
        a[0].parametrizations.weight[0](a[0].parametrizations.weight.original)[[0, 5]], start_raw[[0, 5]]
    )
    effective = a[0].weight.detach().clone()
    unfreeze(a[0], "weight")  # freeze innermost: frozen values written into the parameter, exact
    assert [type(p) for p in a[0].parametrizations.weight] == [Standardize]
    assert torch.equal(a[0].weight, effective)


def test_unfreeze_through_an_invertible_parametrization():
    lin = nn.Linear(5, 4)
    parametrize.register_parametrization(lin, "weight", Scale())
    freeze(lin, "weight", [1])
    train_lin(lin)
    effective = lin.weight.detach().clone()
    unfreeze(lin, "weight")
    assert [type(p) for p in lin.parametrizations.weight] == [Scale]
    torch.testing.assert_close(lin.weight, effective, rtol=1e-6, atol=0)  # w/3*3 rounding


def test_composes_with_finereg_standardize():
    """WS (finereg.standardize) then a partial freeze of the same weight: frozen units stay put, the rest train
    and stay standardized."""
    from finereg import standardize

    conv = nn.Conv2d(3, 6, 3).double()
    standardize(conv)
    freeze(conv, "weight", [2])
    start = conv.weight.detach().clone()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 3, 5, 5, dtype=D)).square().sum().backward()
        opt.step()
    assert torch.equal(conv.weight[2], start[2])
    moved = (conv.weight - start).flatten(1).abs().amax(1)
    assert (moved[[0, 1, 3, 4, 5]] > 1e-4).all()
    flat = conv.weight.detach().flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6, dtype=D), atol=1e-12, rtol=0)


def test_wrapped_module_and_dotted_names():
    model = net()
    freeze(nn.DataParallel(model), "module.0.weight", [1])
    assert frozen_mask(model, "0.weight")[1].all()


def test_clear_errors():
    lin = nn.Linear(5, 4)
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*\(4, 5\)"):
        freeze(lin, "weight", torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        freeze(lin, "weight", torch.zeros(4, 5))
    with pytest.raises(IndexError, match="index 4 is out of range.*4 output units"):
        freeze(lin, "weight", [0, 4])
    with pytest.raises(IndexError, match="out of range"):
        freeze(lin, "weight", [-5])
    with pytest.raises(TypeError, match="ints"):
        freeze(lin, "weight", [0.5])
    with pytest.raises(TypeError, match="ints"):
        freeze(lin, "weight", [True, False, True, False])
    with pytest.raises(KeyError, match="did you mean.*'weight'"):
        freeze(lin, "wieght", [0])
    with pytest.raises(KeyError, match="submodule"):
        freeze(net(), "9.weight", [0])
    with pytest.raises(ValueError, match="not frozen"):
        unfreeze(lin, "weight")
    with pytest.raises(TypeError, match="bool mask of the parameter's shape or a sequence"):
        freeze(lin, "weight", 3)
    assert not parametrize.is_parametrized(lin)  # failed calls leave the module untouched
    with pytest.raises(ValueError, match="bool mask"):
        PartialFreeze(torch.zeros(3), torch.zeros(3))


def test_deep_copies_own_their_parametrization_class():
    """issue 9 #12: a copy of a frozen model (an L2-SP anchor, say) survives unfreezing or freezing the other."""
    x = torch.randn(2, 3, 6, 6, dtype=D)
    a = net()
    freeze(a, "0.weight", [0])
    before = a(x).detach()
    b = copy.deepcopy(a)
    unfreeze(b, "0.weight")  # used to delete the property from the class a shares
    torch.testing.assert_close(a(x), before)
    assert frozen_mask(a, "0.weight") is not None and frozen_mask(b, "0.weight") is None
    c = copy.deepcopy(a)
    freeze(c, "0.bias", [0])  # used to add a 'bias' property a's parametrizations cannot serve (KeyError)
    torch.testing.assert_close(a(x), before)
    assert frozen_mask(a, "0.bias") is None and frozen_mask(c, "0.bias") is not None
    model = net()
    freeze(model, "3.weight", [1, 2])
    source = copy.deepcopy(model)  # the realistic case: the pretrained anchor, then gradual unfreezing
    unfreeze(model, "3.weight")
    torch.testing.assert_close(source(x), model(x))


def conv_data(n_batches=4, batch=4):
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(batch, 1024, 7, 7, generator=g, dtype=D), torch.randn(batch, 10, 7, 7, generator=g, dtype=D))
        for _ in range(n_batches)
    ]


def test_frozen_filters_stay_while_a_penalty_over_all_filters_trains_the_others():
    """A 1×1 conv 1024 → 10 kept orthogonal (Keras's value over all 10 filters) with filters chosen at run time
    frozen: the frozen ones never move, and the penalty sees them."""
    conv = nn.Conv2d(1024, 10, 1, bias=False).double()
    penalty = Orthogonality(WeightGroup(conv), factor=0.01)  # over all 10 filters
    frozen = torch.randperm(10)[:4].tolist()  # chosen at run time
    trainable = [i for i in range(10) if i not in frozen]
    start = conv.weight.detach().clone()
    freeze(conv, "weight", frozen)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2, weight_decay=0.1)
    keras_reg = OrthogonalRegularizer(0.01, "columns")  # Keras layout (1, 1, 1024, 10): filters = columns
    for x, y in conv_data():
        opt.zero_grad()
        reg = penalty()
        torch.testing.assert_close(reg, keras_reg(conv.weight, layout="torch"))  # Keras's value, frozen included
        (F.mse_loss(conv(x), y) + reg).backward()
        opt.step()
        assert torch.equal(conv.weight[frozen], start[frozen])
    assert not torch.equal(conv.weight[trainable], start[trainable])

    # the penalty depends on the frozen filters: its gradient on the trainable ones changes with them,
    # and nothing reaches the frozen ones
    original = conv.parametrizations.weight.original

    def penalty_grad():
        original.grad = None
        penalty().backward()
        return original.grad.clone()

    g1 = penalty_grad()
    assert torch.equal(g1[frozen], torch.zeros_like(g1[frozen]))
    with torch.no_grad():
        conv.parametrizations.weight[0].values[frozen] = torch.randn(len(frozen), 1024, 1, 1, dtype=D)
    g2 = penalty_grad()
    assert (g1[trainable] - g2[trainable]).abs().max() > 1e-6
