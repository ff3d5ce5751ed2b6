"""What the wrappers refuse, and that a refusal changes nothing: state dicts of another model or with non-finite
values, non-finite or meta anchors, bad per-group overrides (at construction, in add_param_group, at step time),
coefficients that reverse the pull towards θ0, optimizers that need their closure (issue 17 items 6, 7, 8, 13,
16, 18)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg._checks import FineregError, FineregTypeError
from finereg.optim import FTP, SPD, DecoupledL2SP

pytestmark = pytest.mark.usefixtures("one_thread")

WRAPPERS = {
    "spd": lambda opt, *a, **kw: SPD(opt, *a, weight_decay=0.7, **kw),
    "ftp": lambda opt, *a, **kw: FTP(opt, *a, **kw),
    "l2sp": lambda opt, *a, **kw: DecoupledL2SP(opt, *a, alpha=0.5, **kw),
}


def net(width=5, seed=0):
    """Four parameters; another ``width`` gives the same count with other shapes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def steps(model, opt, n=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def trained(wrapper, width=5, seed=0, lr=0.1):
    model = net(width, seed)
    opt = WRAPPERS[wrapper](torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    steps(model, opt)
    return model, opt


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    """Two state dicts equal, tensors bit for bit."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


# ------------------------------------------------------------------------------------ load_state_dict (item 6)
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_state_of_another_model_with_as_many_parameters_is_refused(wrapper):
    """A state saved for other shapes (same number of tensors) was accepted: anchors broadcast in the step."""
    _, other = trained(wrapper, width=1)
    model, opt = trained(wrapper)
    before = snapshot(opt)
    with pytest.raises(FineregError, match="another model"):
        opt.load_state_dict(other.state_dict())
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_refused_load_changes_nothing(wrapper):
    """The inner optimizer was loaded before the wrapper's part was checked: a bad index left it half-loaded
    (here: the saved learning rate)."""
    model, opt = trained(wrapper)
    sd = snapshot(opt)
    sd["param_groups"][0]["lr"] = 0.5
    own = sd[f"finereg.{type(opt).__name__}"]["state"]
    own[7] = own[0]
    before = snapshot(opt)
    with pytest.raises(FineregError, match="index 7"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda own, sd: own.__setitem__("abc", own.pop(0)), "index 'abc'"),
        (lambda own, sd: own[0].__setitem__("anchor", own[0]["anchor"][:2]), r"has shape \(2, 4\)"),
        (lambda own, sd: own[0].__setitem__("anchor", own[0]["anchor"].long()), "floating-point"),
        (lambda own, sd: own[1].__setitem__("anchor", torch.full_like(own[1]["anchor"], float("nan"))), "NaN or inf"),
        (lambda own, sd: own[2].__setitem__("anchor", torch.full((3, 5), 1e300, dtype=torch.float64)), "NaN or inf"),
        (lambda own, sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(1, 5, 4)), "another model"),
        (lambda own, sd: sd["state"][3].__setitem__("momentum_buffer", torch.tensor([0.0, float("inf"), 0])), "inf"),
        (lambda own, sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups of"),
    ],
    ids=["index", "shape", "dtype", "nan", "overflow", "inner-shape", "inner-inf", "groups"],
)
def test_each_bad_part_of_a_state_dict_is_refused_before_anything_changes(edit, match):
    model, opt = trained("spd")
    sd = snapshot(opt)
    edit(sd["finereg.SPD"]["state"], sd)
    before = snapshot(opt)
    with pytest.raises(FineregError, match=match):
        opt.load_state_dict(sd)
    assert_same(opt.state_dict(), before)


def test_ftp_state_tensors_are_checked():
    model, opt = trained("ftp")
    for key, value in (("scaled_displacement", torch.zeros(5)), ("gamma", torch.zeros(2)), ("step", "2")):
        sd = snapshot(opt)
        sd["finereg.FTP"]["state"][0][key] = value
        with pytest.raises(FineregError, match=repr(key)):
            opt.load_state_dict(sd)
    sd = snapshot(opt)
    sd["finereg.FTP"]["state"][0]["gamma"] = torch.tensor(float("nan"))
    with pytest.raises(FineregError, match="'gamma' of parameter 0"):
        opt.load_state_dict(sd)


def test_a_refused_inner_wrapper_leaves_the_outer_one_unchanged():
    model = net()
    opt = SPD(DecoupledL2SP(torch.optim.SGD(model.parameters(), lr=0.1), alpha=1.0), weight_decay=0.5)
    steps(model, opt)
    sd = snapshot(opt)
    sd["finereg.DecoupledL2SP"]["state"][0]["anchor"] = torch.zeros(1, 4)
    before = snapshot(opt)
    with pytest.raises(FineregError, match="finereg.DecoupledL2SP"):
        opt.load_state_dict(sd)
    assert_same(opt.state_dict(), before)


def test_a_valid_load_still_round_trips():
    model, opt = trained("ftp")
    sd = snapshot(opt)
    fresh = net(seed=3)
    fresh.load_state_dict(model.state_dict())
    opt2 = FTP(torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    opt2.load_state_dict(sd)
    assert_same(opt2.state_dict(), opt.state_dict())


# ------------------------------------------------------------------------------------------ anchors (13, 18)
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_anchors_are_refused(wrapper, bad):
    model = net()
    anchors = [p.detach().clone() for p in model.parameters()]
    anchors[2][1, 3] = bad
    with pytest.raises(FineregError, match=r"anchors must be finite: the anchor of 2\.weight"):
        WRAPPERS[wrapper](
            torch.optim.SGD(model.named_parameters(), lr=0.1),
            dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], anchors)),
        )
    with pytest.raises(FineregError, match="anchors must be finite"):
        WRAPPERS[wrapper](torch.optim.SGD(model.parameters(), lr=0.1), anchors)


def test_anchors_that_overflow_the_parameters_dtype_are_refused():
    model = net()
    anchors = [torch.full(p.shape, 1e300, dtype=torch.float64) for p in model.parameters()]
    with pytest.raises(FineregError, match="in the parameter's dtype"):
        SPD(torch.optim.SGD(model.parameters(), lr=0.1), anchors, weight_decay=1.0)


def test_meta_anchors_and_bad_exclude_are_clear_errors():
    model = net()
    with torch.device("meta"):
        meta = net()
    with pytest.raises(FineregError, match="meta device"):
        SPD(torch.optim.SGD(model.parameters(), lr=0.1), list(meta.parameters()), weight_decay=1.0)
    with pytest.raises(FineregTypeError, match="exclude must be glob patterns.*got 123"):
        SPD(torch.optim.SGD(model.parameters(), lr=0.1), exclude=123, weight_decay=1.0)


# ------------------------------------------------------------------------------------- per-group overrides (8)
@pytest.mark.parametrize(
    "make, key",
    [
        (lambda g: SPD(torch.optim.SGD([{**g, "spd_weight_decay": -1.0}], lr=0.1), weight_decay=1.0), "spd_weight"),
        (lambda g: FTP(torch.optim.SGD([{**g, "ftp_mu": -0.1}], lr=0.1)), "ftp_mu"),
        (lambda g: FTP(torch.optim.SGD([{**g, "ftp_k": float("nan")}], lr=0.1)), "ftp_k"),
        (lambda g: DecoupledL2SP(torch.optim.SGD([{**g, "l2sp_alpha": -2}], lr=0.1), alpha=1.0), "l2sp_alpha"),
    ],
)
def test_negative_group_overrides_are_refused_at_construction(make, key):
    with pytest.raises(FineregError, match=rf"param_groups\[0\]\['{key}.*must be a finite number >= 0"):
        make({"params": list(net().parameters())})


def test_wrong_types_are_refused_before_step():
    with pytest.raises(FineregTypeError, match=r"\['ftp_k'\] must be a finite number >= 0, got '1'"):
        FTP(torch.optim.SGD([{"params": list(net().parameters()), "ftp_k": "1"}], lr=0.1))


def test_groups_added_later_are_checked_and_not_added():
    model = net()
    opt = FTP(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(FineregError, match=r"new param group\['ftp_mu'\]"):
        opt.add_param_group({"params": list(model[2].parameters()), "ftp_mu": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("value, error", [(-0.5, FineregError), ("0.5", FineregTypeError)])
def test_edited_groups_are_checked_at_step_time_before_any_write(value, error):
    model, opt = trained("l2sp")
    opt.param_groups[0]["l2sp_alpha"] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=r"param_groups\[0\]\['l2sp_alpha'\]"):
        steps(model, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    sd = snapshot(opt)  # and a state dict carrying such a value is refused
    opt.param_groups[0]["l2sp_alpha"] = 0.5
    with pytest.raises(error, match=r"state_dict\['param_groups'\]\[0\]\['l2sp_alpha'\]"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------- reversed pull (item 7)
@pytest.mark.parametrize("key, value", [("l2sp_alpha", 3.0), ("l2sp_beta", 2.5)])
def test_decoupled_l2sp_refuses_a_lerp_past_the_anchor(key, value):
    """lr·α > 1 steps past θ0 (lr·β > 1 flips the sign of new parameters): refused before any write."""
    model = net()
    new = "2.*" if key == "l2sp_beta" else None
    opt = DecoupledL2SP(torch.optim.SGD(model.named_parameters(), lr=0.5), alpha=1.0, new_params=new)
    opt.param_groups[0][key] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FineregError, match=r"lr·(alpha|beta) = 0\.5·.* > 1"):
        steps(model, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_decoupled_l2sp_at_lr_alpha_1_lands_on_the_anchor():
    model = net()
    anchors = [p.detach().clone() for p in model.parameters()]
    opt = DecoupledL2SP(torch.optim.SGD(model.parameters(), lr=0.5), alpha=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), anchors))


def spd_one_step(lam):
    """θ = 1, θ0 = 0, g = 1 under SGD(lr=1, maximize=True): θ̃ = 2, selected (⟨g, θ − θ0⟩ > 0), r = 1/2."""
    p = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = SPD(torch.optim.SGD([p], lr=1.0, maximize=True), [torch.zeros(1)], weight_decay=lam)
    p.grad = torch.ones_like(p)
    opt.step()
    return p


def test_spd_refuses_a_projection_that_reverses_the_pull():
    with pytest.raises(FineregError, match=r"λ·r = 2\.5 > 2 .*reverses the pull"):
        spd_one_step(5.0)
    assert spd_one_step(4.0).item() == -2.0  # λ·r = 2: mirrored onto θ0's other side at the same distance
    assert spd_one_step(3.0).item() == pytest.approx(2 - 1.5 * 2)


# ------------------------------------------------------------------------------------------ closure (item 16)
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_an_optimizer_that_needs_its_closure_is_refused_at_construction(wrapper):
    with pytest.raises(FineregError, match="cannot wrap LBFGS: its step\\(\\) needs a closure"):
        WRAPPERS[wrapper](torch.optim.LBFGS(net().parameters()))


def test_a_closure_is_still_passed_for_other_optimizers():
    model = net()
    opt = SPD(torch.optim.SGD(model.parameters(), lr=0.1), weight_decay=0.5)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
