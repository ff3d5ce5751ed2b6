"""fisher_diagonal: the mean squared per-sample gradient of the official code (batches of one sample, one backward
each), computed in one vectorized pass per batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg._checks import FineregError
from finereg.merge import fisher_diagonal

pytestmark = pytest.mark.usefixtures("one_thread")


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
    return m


def data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
        for _ in range(3)
    ]


def naive(m, batches_with_labels):
    """One backward per sample in eval mode, squared gradients averaged (the official loop)."""
    m.eval()
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    count = 0
    for x, y in batches_with_labels:
        for i in range(len(x)):
            m.zero_grad()
            F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in m.named_parameters():
                acc[n] += p.grad**2
            count += 1
    return {n: a / count for n, a in acc.items()}


def test_given_labels_equal_the_per_sample_loop():
    m = model()
    got = fisher_diagonal(m, data(), labels="given")
    want = naive(model(), data())
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)


def test_sampled_labels_come_from_the_model_prediction():
    m = model()
    got = fisher_diagonal(m, data(), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ref = model().eval()
    sampled = []
    with torch.no_grad():
        for x, _ in data():
            sampled.append((x, torch.multinomial(torch.softmax(ref(x).float(), -1), 1, generator=g).view(-1)))
    want = naive(model(), sampled)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)


def test_mode_is_restored_and_frozen_parameters_are_left_out():
    m = model()
    m[0].weight.requires_grad_(False)
    m.train()
    got = fisher_diagonal(m, data(), labels="given", chunk_size=2)
    assert m.training and "0.weight" not in got and set(got) == {"0.bias", "1.weight", "1.bias", "4.weight", "4.bias"}


def test_errors():
    with pytest.raises(FineregError, match="labels must be one of"):
        fisher_diagonal(model(), data(), labels="true")
    with pytest.raises(FineregError, match="no sample"):
        fisher_diagonal(model(), [])


class Pair(nn.Module):
    """Returns (logits, features): a tuple, not logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4).double()

    def forward(self, x):
        return self.fc(x), x


@pytest.mark.parametrize("labels", ["sampled", "given"])
def test_user_errors_are_named(labels):
    """A tuple output, an empty batch, NaN inputs and (given) out-of-range labels raised torch's own errors."""
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FineregError, match="one tensor, got a tuple"):
        fisher_diagonal(Pair(), [(x, y)], labels=labels)
    lin = nn.Linear(3, 4).double()
    with pytest.raises(FineregError, match=r"batch 1 has no sample \(inputs of shape \(0, 3\)\)"):
        fisher_diagonal(lin, [(x, y), (x[:0], y[:0])], labels=labels)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(FineregError, match="batch 0's inputs hold NaN or inf"):
        fisher_diagonal(lin, [(bad, y)], labels=labels)


def test_given_labels_out_of_range_are_named():
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = nn.Linear(3, 4).double()
    with pytest.raises(FineregError, match=r"batch 0's labels must be 4 class indices in 0\.\.3.*got range \[-1, 7\]"):
        fisher_diagonal(lin, [(x, torch.tensor([0, 7, -1, 2]))], labels="given")


def test_non_finite_weights_give_an_error_not_a_nan_fisher():
    lin = nn.Linear(3, 4).double()
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FineregError, match="outputs on batch 0 hold NaN"):
        fisher_diagonal(lin, [(x, y)])
    with pytest.raises(FineregError, match="the Fisher holds NaN or inf"):
        fisher_diagonal(lin, [(x, y)], labels="given")
