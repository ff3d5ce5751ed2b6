"""Uniform and greedy model soups (Wortsman et al., ICML 2022)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finereg._checks import FineregError
from finereg.merge import greedy_soup, uniform_soup

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    m[1].num_batches_tracked.fill_(seed)
    return m


def test_uniform_soup_is_the_mean_and_keeps_shared_entries():
    models = [net(s) for s in range(4)]
    shared = models[0][2].bias.detach().clone()
    for m in models:
        with torch.no_grad():
            m[2].bias.copy_(shared)  # frozen in every run
    soup = uniform_soup(models)
    for k, v in soup.items():
        if v.is_floating_point():
            mean = torch.stack([m.state_dict()[k] for m in models]).mean(0)
            torch.testing.assert_close(v, mean, rtol=1e-14, atol=1e-15)
    assert torch.equal(soup["2.bias"], shared)
    assert int(soup["1.num_batches_tracked"]) == 0  # the first ingredient's


def official_greedy(states, score):
    """The greedy recipe as in the paper's code: sort by score, add when the held-out score improves."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    soup, kept, best = dict(states[order[0]]), [order[0]], scores[order[0]]
    for i in order[1:]:
        n = len(kept)
        cand = {k: soup[k] * (n / (n + 1.0)) + states[i][k] * (1.0 / (n + 1)) for k in soup}
        s = score(cand)
        if s > best:
            soup, kept, best = cand, kept + [i], s
    return kept, best


def test_greedy_soup_follows_the_recipe():
    models = [net(s) for s in range(6)]
    target = torch.stack([m[0].weight.detach() for m in models[:3]]).mean(0)  # the soup of 0, 1, 2 is ideal

    def score_state(state):
        return -float((state["0.weight"] - target).norm())

    def evaluate(model):
        return score_state(model.state_dict())

    states = [{k: v for k, v in m.state_dict().items() if v.is_floating_point()} for m in models]
    kept, best = official_greedy(states, score_state)
    res = greedy_soup(net(9), models, evaluate)
    assert res.ingredients == kept and res.score == pytest.approx(best, rel=1e-12)
    assert len(res.scores) == 6 and res.score >= max(res.scores)
    assert sorted(kept) == [0, 1, 2]


def test_greedy_soup_minimizing_a_loss():
    models = [net(s) for s in range(3)]
    res = greedy_soup(net(9), models, lambda m: float(m[2].weight.abs().sum()), maximize=False)
    assert res.score <= min(res.scores)


def test_errors():
    with pytest.raises(FineregError, match="non-empty list"):
        uniform_soup([])
    with pytest.raises(FineregError, match="non-empty list"):
        uniform_soup(net(0))
    with pytest.raises(FineregError, match="evaluate must be a callable"):
        greedy_soup(net(0), [net(1)], None)


@pytest.mark.parametrize("error", [RuntimeError("evaluation failed"), KeyboardInterrupt()])
def test_greedy_soup_restores_the_model_when_evaluate_raises(error):
    model, states = net(9), [net(s) for s in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 4:  # the first candidate soup is loaded
            raise error
        return float(len(calls))

    with pytest.raises(type(error)):
        greedy_soup(model, states, evaluate)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_greedy_soup_refuses_a_nan_metric_in_a_mapping():
    scores = iter([0.5, float("nan"), 0.4])
    with pytest.raises(FineregError, match="must be a finite number, got nan"):
        greedy_soup(net(9), [net(s) for s in range(3)], lambda m: {"val": next(scores)}, select="val")


def test_a_generator_of_ingredients_is_a_clear_error():
    with pytest.raises(FineregError, match=r"list \(or tuple\).*got generator: pass list\(...\)"):
        uniform_soup(net(i) for i in range(2))
    torch.testing.assert_close(uniform_soup((net(0), net(0)))["0.weight"], net(0)[0].weight.detach())
