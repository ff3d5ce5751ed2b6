"""WiSE-FT: the interpolation formula, exact end points, integer buffers, frozen entries, the Fisher-weighted merge
of the official code, the α sweep with BatchNorm statistics recomputed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import finereg
from finereg._checks import FineregError
from finereg.merge import wise_ft, wise_ft_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():  # distinct BatchNorm statistics and counters
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].num_batches_tracked.fill_(seed + 3)
    return m


def official(alpha, theta_0, theta_1):
    """mlfoundations/wise-ft's expression."""
    return {key: (1 - alpha) * theta_0[key] + alpha * theta_1[key] for key in theta_0}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_formula_and_exact_end_points(alpha):
    m0, m1 = net(0), net(1)
    out = wise_ft(m0, m1, alpha)
    ref = official(alpha, m0.state_dict(), m1.state_dict())
    for k, v in out.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(v, torch.lerp(m0.state_dict()[k], m1.state_dict()[k], alpha), rtol=0, atol=0)
    if alpha in (0.0, 1.0):
        src = (m0 if alpha == 0.0 else m1).state_dict()
        for k, v in out.items():
            if v.is_floating_point():
                assert torch.equal(v, src[k]), k


def test_integer_buffers_come_from_the_fine_tuned_model():
    m0, m1 = net(0), net(1)
    out = wise_ft(m0, m1, 0.4)
    assert out["1.num_batches_tracked"].dtype == torch.long
    assert int(out["1.num_batches_tracked"]) == int(m1[1].num_batches_tracked) == 4
    net(2).load_state_dict(out)  # loads into the architecture


def test_frozen_entries_are_untouched():
    """Equal entries (frozen rows) come out bit for bit at any α; frozen parameters of θ1 are θ1's."""
    m0, m1 = net(0), net(1)
    with torch.no_grad():
        m1[0].weight[:2] = m0[0].weight[:2]  # rows 0-1 frozen during fine-tuning
    m1[3].bias.requires_grad_(False)  # a frozen parameter that differs from θ0 (e.g. loaded elsewhere)
    for alpha in (0.1, 0.37, 0.5, 0.77):
        out = wise_ft(m0, m1, alpha)
        assert torch.equal(out["0.weight"][:2], m1[0].weight[:2])
        assert torch.equal(out["3.bias"], m1[3].bias)
        assert not torch.equal(out["0.weight"][2:], m1[0].weight[2:])


def test_state_dicts_with_wrapper_prefixes_match_modules():
    m0, m1 = net(0), net(1)
    ddp_like = {f"module.{k}": v for k, v in m0.state_dict().items()}
    a, b = wise_ft(ddp_like, m1.state_dict(), 0.25), wise_ft(m0, m1, 0.25)
    assert list(a) == list(m1.state_dict())
    for k in a:
        assert torch.equal(a[k], b[k])


def test_mismatched_models_are_clear_errors():
    m0, m1 = net(0), net(1)
    bad = dict(m0.state_dict())
    del bad["3.bias"]
    with pytest.raises(FineregError, match="lacks '3.bias'"):
        wise_ft(bad, m1, 0.5)
    other = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5)).double()
    with pytest.raises(FineregError, match="other shapes"):
        wise_ft(other, m1, 0.5)
    with pytest.raises(FineregError, match="alpha must be"):
        wise_ft(m0, m1, 1.5)


def test_fisher_merge_matches_the_official_formula():
    m0, m1 = net(0), net(1)
    s0, s1 = m0.state_dict(), m1.state_dict()
    torch.manual_seed(5)
    names = ["0.weight", "0.bias", "3.weight"]  # 3.bias and the buffers have no Fisher: plain interpolation
    f0 = {n: torch.rand_like(s0[n]) * 2 for n in names}
    f1 = {n: torch.rand_like(s1[n]) * 2 for n in names}
    f0["0.bias"][0] = 0.0  # the floor acts here
    floor = 1e-8
    for alpha in (0.2, 0.6):
        out = wise_ft(m0, m1, alpha, fishers=(f0, f1), fisher_floor=floor)
        for k in s1:  # the official _merge: missing Fisher → ones
            if not s1[k].is_floating_point():
                continue
            ones = torch.ones_like(s0[k])
            c0 = (1 - alpha) * torch.maximum(f0.get(k, ones), floor * ones)
            c1 = alpha * torch.maximum(f1.get(k, ones), floor * ones)
            torch.testing.assert_close(out[k], (c0 * s0[k] + c1 * s1[k]) / (c0 + c1), rtol=1e-13, atol=1e-15)


def test_fisher_for_one_model_only_is_an_error():
    m0, m1 = net(0), net(1)
    f = {"0.weight": torch.ones(6, 4, dtype=torch.float64)}
    with pytest.raises(FineregError, match="one model only"):
        wise_ft(m0, m1, 0.5, fishers=(f, {}))
    with pytest.raises(FineregError, match="do not have"):
        wise_ft(m0, m1, 0.5, fishers=({"nope": torch.ones(1)}, {"nope": torch.ones(1)}))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def test_sweep_picks_the_best_alpha_on_the_callback_and_keeps_its_weights():
    m0, m1 = net(0), net(1)
    target = m0[3].weight.detach() * 0.35 + m1[3].weight.detach() * 0.65  # the metric peaks at α = 0.65 → 0.6 or 0.7
    model = net(2)
    seen = []

    def evaluate(m):
        seen.append(m[3].weight.detach().clone())
        return {"val": -float((m[3].weight - target).norm()), "shifted": 0.0}

    res = wise_ft_sweep(model, m0, m1, evaluate, alphas=[0.0, 0.3, 0.6, 0.7, 1.0], select="val")
    assert res.best_alpha in (0.6, 0.7)
    assert [r["alpha"] for r in res.results] == [0.0, 0.3, 0.6, 0.7, 1.0] and "shifted" in res.results[0]
    want = wise_ft(m0, m1, res.best_alpha)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(seen[0], m0[3].weight) and torch.equal(seen[-1], m1[3].weight)


def test_sweep_prefers_the_larger_alpha_on_a_tie():
    """Equal scores: the α nearer the fine-tuned end wins (it picked α = 0 on a flat metric), in any order."""
    m0, m1 = net(0), net(1)
    model = net(2)
    assert wise_ft_sweep(model, m0, m1, lambda m: 0.5, alphas=[0.0, 0.5, 1.0]).best_alpha == 1.0
    want = wise_ft(m0, m1, 1.0)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    scores = iter([0.9, 0.2, 0.9, 0.9])  # the best score at α = 0.1, 0.4 and 0.3: 0.4 wins, not the first seen
    assert wise_ft_sweep(model, m0, m1, lambda m: next(scores), alphas=[0.1, 0.0, 0.4, 0.3]).best_alpha == 0.4
    losses = iter([1.0, 1.0, 2.0])  # maximize=False: the same rule for a loss
    res = wise_ft_sweep(model, m0, m1, lambda m: next(losses), alphas=[0.2, 0.6, 1.0], maximize=False)
    assert res.best_alpha == 0.6


def test_sweep_recomputes_batchnorm_statistics():
    m0, m1 = net(0), net(1)
    data = batches()
    model = net(2)
    wise_ft_sweep(model, m0, m1, lambda m: 1.0, alphas=[0.5], bn_batches=data)
    ref = net(3)
    ref.load_state_dict(wise_ft(m0, m1, 0.5))
    ref.train()
    with torch.no_grad():  # the cumulative average over the batches, from reset statistics
        ref[1].reset_running_stats()
        ref[1].momentum = None
        for x, _ in data:
            ref(x)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model[1].running_mean, wise_ft(m0, m1, 0.5)["1.running_mean"])


def test_sweep_needs_select_for_several_metrics():
    with pytest.raises(FineregError, match="select="):
        wise_ft_sweep(net(2), net(0), net(1), lambda m: {"val": 1.0, "test": 2.0}, alphas=[0.5])


def test_top_level_exports():
    assert finereg.wise_ft is wise_ft and finereg.wise_ft_sweep is wise_ft_sweep


@pytest.mark.parametrize("error", [RuntimeError("evaluation failed"), KeyboardInterrupt()])
def test_sweep_restores_the_fine_tuned_weights_when_evaluate_raises(error):
    theta0, model = net(0), net(1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 3:  # model holds θ(0.2) now
            raise error
        return 0.5

    with pytest.raises(type(error)):
        wise_ft_sweep(model, theta0, model, evaluate, alphas=(0.0, 0.1, 0.2, 0.3))  # the documented use
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and not model.training


def test_sweep_refuses_a_nan_metric_in_a_mapping():
    theta0, model = net(0), net(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.5, float("nan"), 0.4])
    with pytest.raises(FineregError, match=r"evaluate\(model\)\['val'\] must be a finite number, got nan"):
        wise_ft_sweep(model, theta0, model, lambda m: {"val": next(scores)}, alphas=(0, 0.5, 1), select="val")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_zero_floor_and_non_finite_fishers_are_refused():
    m0, m1 = net(0), net(1)
    zero = {"0.weight": torch.zeros(6, 4, dtype=torch.float64)}  # dead units: exact zeros in both Fishers
    with pytest.raises(FineregError, match="fisher_floor must be a finite number > 0, got 0"):
        wise_ft(m0, m1, 0.5, fishers=(zero, zero), fisher_floor=0)
    for bad in (float("nan"), float("inf"), -1.0):
        f = {"0.weight": torch.ones(6, 4, dtype=torch.float64)}
        f["0.weight"][2, 1] = bad
        with pytest.raises(FineregError, match=r"fishers\[1\]\['0.weight'\] holds negative, NaN or infinite"):
            wise_ft(m0, m1, 0.5, fishers=(zero, f))
    out = wise_ft(m0, m1, 0.5, fishers=(zero, zero))  # the default floor: a plain average there
    torch.testing.assert_close(out["0.weight"], (m0[0].weight + m1[0].weight).detach() / 2)
