"""What SPD, FTP and DecoupledL2SP share: exact resume, parameters without a gradient, anchors, inner optimizers
(foreach / fused), LR schedulers, and the errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg._checks import FineregError
from finereg.optim import FTP, SPD, DecoupledL2SP

from ._reference import FTPReference, spd_after

pytestmark = pytest.mark.usefixtures("one_thread")

WRAPPERS = {
    "spd": lambda opt, **kw: SPD(opt, weight_decay=0.7, **kw),
    "ftp": lambda opt, **kw: FTP(opt, k=0.5, **kw),
    "l2sp": lambda opt, **kw: DecoupledL2SP(opt, alpha=3.0, beta=0.5, **kw),
}
INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True),
}


class TwoBranch(nn.Module):
    """A trunk and two heads; ``forward(x, branch)`` uses one head, so the other has no gradient."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x, branch="a"):
        return getattr(self, branch)(self.trunk(x))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def train_step(model, opt, step):
    x, y = data(step)
    opt.zero_grad()
    F.cross_entropy(model(x, "a" if step % 3 else "b"), y).backward()
    opt.step()


def moved_model(seed=0):
    torch.manual_seed(seed)
    model = TwoBranch().double()
    return model


@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_state_dict_round_trip_resumes_bit_exactly(wrapper, inner):
    """Run 4 steps, save (torch.save), run 4 more; a fresh model + optimizer + wrapper loaded from the save and
    run for the same 4 steps ends bit for bit where the uninterrupted run did, scheduler included."""
    model = moved_model()
    opt = WRAPPERS[wrapper](INNER[inner](model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for s in range(4):
        train_step(model, opt, s)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    for s in range(4, 8):
        train_step(model, opt, s)
        sched.step()

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = moved_model(seed=1)  # other weights: the anchors must come from the state dict
    fresh.load_state_dict(saved["model"])
    opt2 = WRAPPERS[wrapper](INNER[inner](fresh.parameters()))
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for s in range(4, 8):
        train_step(fresh, opt2, s)
        sched2.step()
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


def test_state_dict_holds_every_piece_of_state():
    model = moved_model()
    opt = FTP(torch.optim.SGD(model.parameters(), lr=0.1))
    for s in range(3):
        train_step(model, opt, s)
    sd = opt.state_dict()
    own = sd["finereg.FTP"]["state"]
    assert set(own) == set(range(len(list(model.parameters()))))
    trunk = own[0]
    assert {"anchor", "gamma", "exp_avg", "exp_avg_sq", "step", "scaled_displacement"} <= set(trunk)
    assert "state" in sd and "param_groups" in sd and sd["param_groups"][0]["ftp_k"] == 1.0


def test_parameters_without_grad_are_skipped_without_shifting_state():
    """Head ``b`` has no gradient at steps 1, 2, 4, 5: FTP's result equals the per-parameter reference, and b's
    state and value do not move on those steps (the official FTP indexes its state by a running counter)."""
    torch.manual_seed(0)
    model = TwoBranch().double()
    ref_model = TwoBranch().double()
    ref_model.load_state_dict(model.state_dict())
    anchors = [p.detach() + 0.05 for p in model.parameters()]  # start off the anchors: projections act
    opt = FTP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), [a.clone() for a in anchors])
    ref_inner = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref = FTPReference(anchors)
    for s in range(6):
        x, y = data(s)
        branch = "b" if s % 3 == 0 else "a"
        for m, o in ((model, opt), (ref_model, ref_inner)):
            o.zero_grad()
            F.cross_entropy(m(x, branch), y).backward()
        b_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[model.b.weight].items()}
        b_value = model.b.weight.detach().clone()
        opt.step()
        hyper = ref.hyper_grads(list(ref_model.parameters()))
        ref_inner.step()
        ref.after(list(ref_model.parameters()), hyper)
        if branch == "a":
            assert torch.equal(model.b.weight, b_value)
            after = opt.state[model.b.weight]
            assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in b_state.items())
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


def test_spd_matches_reference_with_skipped_parameters():
    torch.manual_seed(0)
    model = TwoBranch().double()
    ref_model = TwoBranch().double()
    ref_model.load_state_dict(model.state_dict())
    anchors = [p.detach() - 0.03 for p in model.parameters()]
    opt = SPD(torch.optim.Adam(model.parameters(), lr=1e-2), [a.clone() for a in anchors], weight_decay=0.9)
    ref_inner = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for s in range(6):
        x, y = data(s)
        branch = "b" if s % 3 == 0 else "a"
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x, branch), y).backward()
        opt.step()
        params = list(ref_model.parameters())
        before = [p.detach().clone() for p in params]
        grads = [p.grad for p in params]
        ref_inner.step()
        spd_after(params, before, grads, anchors, 0.9)
        for (n, p), q in zip(model.named_parameters(), params):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_foreach_and_fused_inner_optimizers_agree(wrapper):
    """The same wrapper around Adam in its three implementations (for-loop, foreach, fused) gives one trajectory."""
    finals = []
    for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        model = moved_model()
        opt = WRAPPERS[wrapper](torch.optim.Adam(model.parameters(), lr=1e-2, **kw))
        for s in range(5):
            train_step(model, opt, s)
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_scheduler_lr_reaches_the_inner_optimizer_and_the_decay():
    model = moved_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DecoupledL2SP(inner, alpha=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    assert opt.param_groups is inner.param_groups
    opt.step()  # no gradients yet: nothing moves
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only the decay, with the scheduled lr: θ − 0.01·1·(θ − θ0)
    for p, a in zip(model.parameters(), anchor):
        torch.testing.assert_close(p.detach(), a + 0.99, rtol=1e-12, atol=1e-12)


def test_per_group_hyper_parameters():
    """A group's own ``spd_weight_decay`` wins over the wrapper's default: λ = 0 on the trunk, 5 on the head."""
    model = moved_model()
    groups = [{"params": model.trunk.parameters(), "spd_weight_decay": 0.0}, {"params": model.a.parameters()}]
    opt = SPD(torch.optim.SGD(groups, lr=0.1), weight_decay=5.0)
    assert [g["spd_weight_decay"] for g in opt.param_groups] == [0.0, 5.0]
    ref_model = moved_model()
    ref_params = [*ref_model.trunk.parameters(), *ref_model.a.parameters()]
    anchors = [p.detach().clone() for p in ref_params]
    ref = torch.optim.SGD(ref_params, lr=0.1)
    lams = [0.0] * 4 + [5.0] * 2
    for s in range(3):
        x, y = data(s)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        opt.step()
        before = [p.detach().clone() for p in ref_params]
        ref.step()
        for i, lam in enumerate(lams):
            spd_after([ref_params[i]], [before[i]], [ref_params[i].grad], [anchors[i]], lam)
    mine = [*model.trunk.parameters(), *model.a.parameters()]
    for p, q in zip(mine, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_add_param_group_anchors_at_the_first_step():
    model = moved_model()
    opt = DecoupledL2SP(torch.optim.SGD(model.trunk.parameters(), lr=0.1), alpha=2.0)
    opt.add_param_group({"params": list(model.a.parameters())})
    assert opt.param_groups[-1]["l2sp_alpha"] == 2.0
    start = model.a.weight.detach().clone()
    train_step(model, opt, 1)
    torch.testing.assert_close(opt.state[model.a.weight]["anchor"], start, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- anchors
def test_anchor_forms_agree():
    """None (snapshot), a list, a state dict by name (named_parameters optimizer) and a module with model=."""
    torch.manual_seed(3)
    source = TwoBranch().double()
    results = []
    for form in ("none", "list", "state_dict", "module"):
        model = TwoBranch().double()
        model.load_state_dict(source.state_dict())
        params = model.named_parameters() if form == "state_dict" else model.parameters()
        inner = torch.optim.Adam(params, lr=1e-2)
        anchors = {"none": None, "list": list(source.parameters()), "state_dict": source.state_dict()}.get(form, source)
        opt = SPD(inner, anchors, weight_decay=1.0, **({"model": model} if form == "module" else {}))
        for s in range(4):
            train_step(model, opt, s)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_spd_zero_anchors_keep_no_copy_and_equal_explicit_zeros():
    runs = []
    for anchors in ("zero", "zeros"):
        model = moved_model()
        explicit = [torch.zeros_like(p) for p in model.parameters()]
        opt = spd(torch.optim.Adam(model.parameters(), lr=1e-2), anchors if anchors == "zero" else explicit)
        if anchors == "zero":
            assert all(opt.state[p]["anchor"] == "zero" for p in model.parameters())
        for s in range(4):
            train_step(model, opt, s)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_missing_names_are_unanchored_and_patterns_select():
    source = TwoBranch().double()
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("b.")}  # "b" is a new head
    model = TwoBranch().double()
    opt = FTP(torch.optim.SGD(model.named_parameters(), lr=0.1), sd, exclude="a.*")
    anchored = {id(p) for p in opt.anchored}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in anchored) == sorted(n for n, _ in model.named_parameters() if n.startswith("trunk"))


def test_decoupled_l2sp_new_params_decay_towards_zero():
    source = TwoBranch().double()
    model = TwoBranch().double()
    model.load_state_dict(source.state_dict())
    opt = DecoupledL2SP(
        torch.optim.SGD(model.parameters(), lr=0.1), source, alpha=1.0, beta=0.5, model=model, new_params="b.*"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.05) if n.startswith("b.") else before[n] - 0.1 * 1.0 * 1.0
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12, msg=n)


def sgd(m, named=False):
    return torch.optim.SGD(m.named_parameters() if named else m.parameters(), lr=0.1)


def spd(opt, *args, weight_decay=1.0, **kwargs):
    return SPD(opt, *args, weight_decay=weight_decay, **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: spd(m), "must be a torch.optim.Optimizer"),
        (lambda m: spd(spd(sgd(m))), "already wrapped"),
        (lambda m: spd(sgd(m), weight_decay=-1), "weight_decay must be"),
        (lambda m: FTP(sgd(m), "zero"), "anchors must be"),
        (lambda m: spd(sgd(m), {"x": torch.zeros(1)}), "matched by name"),
        (lambda m: spd(sgd(m), exclude="a.*"), "need parameter names"),
        (lambda m: spd(sgd(m, named=True), exclude="head.*"), "matches no parameter"),
        (lambda m: spd(sgd(m), [torch.zeros(1)]), "one tensor"),
        (lambda m: spd(sgd(m), [torch.zeros(1)] * len(list(m.parameters()))), "shapes differ"),
        (lambda m: spd(sgd(m, named=True), {"x": torch.zeros(1)}), "no parameter name"),
    ],
)
def test_errors(make, match):
    with pytest.raises(FineregError, match=match):
        make(TwoBranch())


def test_loading_a_plain_state_dict_is_a_clear_error():
    model = TwoBranch()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FineregError, match="not saved by SPD"):
        spd(sgd(model)).load_state_dict(inner.state_dict())
    ftp_sd = FTP(torch.optim.SGD(model.parameters(), lr=0.1)).state_dict()
    with pytest.raises(FineregError, match="finereg.FTP"):
        spd(sgd(model)).load_state_dict(ftp_sd)


def test_wrappers_compose():
    """SPD around DecoupledL2SP around SGD: both act, and the state dict round-trips both."""
    model = moved_model()
    opt = SPD(DecoupledL2SP(torch.optim.SGD(model.parameters(), lr=0.1), alpha=1.0), weight_decay=0.5)
    for s in range(3):
        train_step(model, opt, s)
    sd = opt.state_dict()
    assert "finereg.SPD" in sd and "finereg.DecoupledL2SP" in sd
    fresh = moved_model(seed=2)
    fresh.load_state_dict(model.state_dict())
    opt2 = SPD(DecoupledL2SP(torch.optim.SGD(fresh.parameters(), lr=0.1), alpha=1.0), weight_decay=0.5)
    opt2.load_state_dict(sd)
    for s in range(3, 5):
        train_step(model, opt, s)
        train_step(fresh, opt2, s)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
