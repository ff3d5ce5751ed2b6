"""DecoupledL2SP: the loss-term L2-SP's trajectory under plain SGD, a different one under momentum and Adam, and
the same numbers under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg import L2SP
from finereg.optim import DecoupledL2SP

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(seed=0):
    torch.manual_seed(seed)
    source = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()  # a new 4-class head
    model[0].load_state_dict(source[0].state_dict())
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))
    return source, model, x, y


def run(model, opt, x, y, penalty=None, steps=6):
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_equals_loss_term_l2sp_under_plain_sgd():
    """θ − η·(g + α(θ − θ0)) (+ β·θ for the new head) either way."""
    source, model, x, y = setup()
    twin = setup()[1]
    lr, alpha, beta = 0.1, 0.3, 0.05
    decoupled = DecoupledL2SP(
        torch.optim.SGD(model.named_parameters(), lr=lr), source.state_dict(), alpha=alpha, beta=beta, new_params="2.*"
    )
    a = run(model, decoupled, x, y)
    penalty = L2SP(twin, source, alpha=alpha, beta=beta, new_params="2.*")
    b = run(twin, torch.optim.SGD(twin.parameters(), lr=lr), x, y, penalty)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "inner", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=0.01)]
)
def test_differs_from_loss_term_under_momentum_and_adam(inner):
    source, model, x, y = setup()
    twin = setup()[1]
    decoupled = DecoupledL2SP(inner(model.named_parameters()), source.state_dict(), alpha=0.5, new_params="2.*")
    a = run(model, decoupled, x, y)
    b = run(twin, inner(twin.parameters()), x, y, L2SP(twin, source, alpha=0.5, beta=0.0, new_params="2.*"))
    assert max((p - q).abs().max().item() for p, q in zip(a, b)) > 1e-6


def test_pull_is_the_same_fraction_of_the_distance_under_adam():
    """With a zero task gradient, Adam does not move θ and the decoupled step moves every coordinate by η·α of its
    distance to θ0 (the loss-term form would move each by about η, whatever the distance: Adam normalizes)."""
    source, model, x, y = setup()
    opt = DecoupledL2SP(torch.optim.Adam(model[0].parameters(), lr=0.01), list(source[0].parameters()), alpha=2.0)
    with torch.no_grad():
        model[0].weight.add_(torch.linspace(-1, 1, 35, dtype=torch.float64).view(7, 5))
    before = model[0].weight.detach().clone()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    model[0].bias.grad = torch.zeros_like(model[0].bias)
    opt.step()
    torch.testing.assert_close(model[0].weight - source[0].weight, (before - source[0].weight) * (1 - 0.02))


def test_compiled_step_equals_eager():
    """``torch.compile(opt.step)`` (the decay fused into the inner update) gives the eager numbers
    (aot_eager backend: the same graph capture without the C++ compile of inductor)."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        source, model, x, y = setup()
        model.float()
        source.float()
        opt = DecoupledL2SP(
            torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, foreach=True),
            source.state_dict(),
            alpha=0.5,
            beta=0.1,
            new_params="2.*",
        )
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x.float()), y).backward()
            step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
