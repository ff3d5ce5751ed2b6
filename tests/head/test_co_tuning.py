"""Co-Tuning: the loss and the direct relationship (golden), the calibrated reverse relationship (planted
relationship recovered), the disk cache, the regularizer module, bad input."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg._checks import FineregError
from finereg.head.co_tuning import (
    CategoryRelationship,
    CoTuning,
    CoTuningLoss,
    co_tuning_loss,
    collect_source_outputs,
    direct_relationship,
    reverse_relationship,
)
from tests.head._util import Counting


def test_loss_golden(golden):
    case = golden["co_tuning_loss"]
    x = case["input"].clone().requires_grad_(True)
    value = CoTuningLoss()(x, case["target"])
    value.backward()
    torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, case["grad"], rtol=1e-6, atol=1e-8)


def test_direct_golden(golden):
    case = golden["relationship_direct"]
    rel = direct_relationship(case["source_probabilities"], case["target_labels"])
    torch.testing.assert_close(rel, case["relationship"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        CategoryRelationship.direct(case["source_probabilities"], case["target_labels"]).relationship,
        case["relationship"],
    )


def test_direct_matches_per_class_mean():
    p = torch.softmax(torch.randn(30, 6, dtype=torch.float64), 1)
    y = torch.arange(30) % 4
    expected = torch.stack([p[y == i].mean(0) for i in range(4)])
    torch.testing.assert_close(direct_relationship(p, y), expected)
    torch.testing.assert_close(direct_relationship(p, y).sum(1), torch.ones(4, dtype=torch.float64))


def _planted(n, seed=0):
    """y_s ~ p(y_s); y_t ~ p(y_t | y_s) = R[y_s]; a confident, noisy source model. Truth p(y_s | y_t)."""
    g = torch.Generator().manual_seed(seed)
    p_s = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    R = torch.tensor(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64
    )
    y_s = torch.multinomial(p_s, n, replacement=True, generator=g)
    y_t = torch.multinomial(R[y_s], 1, generator=g).squeeze(1)
    logits = 7.0 * F.one_hot(y_s, 5).double() + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    joint = R * p_s[:, None]
    return logits, y_t, (joint / joint.sum(0)).T


def test_reverse_recovers_planted_relationship():
    logits, y_t, truth = _planted(6000)
    fit = reverse_relationship(logits, y_t, inputs="logits", l2_grid=[1e-1, 1e-3, 1e-5], return_details=True)
    assert (fit.relationship - truth).abs().max() < 0.03
    torch.testing.assert_close(fit.relationship.sum(1), torch.ones(3, dtype=torch.float64))
    # the choices are the minimizers they claim to be
    assert fit.l2 == min(fit.holdout_nll, key=fit.holdout_nll.get)
    assert fit.calibrated_nll <= fit.holdout_nll[fit.l2] + 1e-12
    # Bayes' rule with the source marginal, recomputed by hand
    joint = fit.target_given_source * fit.source_marginal[:, None]
    torch.testing.assert_close(fit.relationship, (joint / joint.sum(0)).T)
    torch.testing.assert_close(fit.source_marginal, torch.softmax(logits, 1).mean(0))


def test_reverse_temperature_minimizes_holdout_nll():
    """A weakly regularized fit on few samples is overconfident: the learned temperature (> 1) is the argmin
    of the held-out NLL over a fine grid of temperatures."""
    from finereg.head.co_tuning import _fit_logreg, _stratified_split

    logits, y_t, _ = _planted(300, seed=3)
    p = torch.softmax(logits, 1)
    fit = reverse_relationship(p, y_t, l2_grid=[1e-6], return_details=True)
    hold = _stratified_split(y_t, 3, 0.2, torch.Generator().manual_seed(0))
    w = _fit_logreg(p[~hold], y_t[~hold], 3, 1e-6, None, 200)
    temps = torch.linspace(0.3, 6.0, 2000, dtype=torch.float64)
    log_probs = torch.log_softmax((p[hold] @ w.T)[None] / temps[:, None, None], dim=2)  # (temps, n, N_t)
    nll = -log_probs.gather(2, y_t[hold][None, :, None].expand(len(temps), -1, 1)).mean((1, 2))
    assert fit.temperature != pytest.approx(1.0, abs=0.05)  # learned, not a constant
    assert fit.temperature == pytest.approx(float(temps[nll.argmin()]), abs=0.01)


def test_reverse_probabilities_equal_logits_input():
    logits, y_t, _ = _planted(400, seed=1)
    a = reverse_relationship(logits, y_t, inputs="logits", l2_grid=[1e-3, 1e-2])
    b = reverse_relationship(torch.softmax(logits, 1), y_t, l2_grid=[1e-3, 1e-2])
    torch.testing.assert_close(a, b)


def test_regularizer_module():
    rel = torch.softmax(torch.randn(3, 5), 1)
    reg = CoTuning(rel)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 2, 2, 1])
    torch.testing.assert_close(reg(logits, labels), co_tuning_loss(logits, rel[labels]))
    assert "relationship.relationship" in reg.state_dict()  # saved with the model
    with pytest.raises(ValueError, match=r"must be \(batch, 5\)"):
        reg(torch.randn(4, 6), labels)
    with pytest.raises(ValueError, match="target labels must be in 0..2"):
        reg(logits, torch.tensor([0, 1, 2, 3]))


def _loader(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=16)


def test_from_loader_matches_tensors_and_caches(tmp_path):
    model = Counting(nn.Linear(4, 6))
    loader = _loader()
    logits, labels = collect_source_outputs(model, loader)
    calls = model.calls
    direct = CategoryRelationship.from_loader(model, loader, "direct", cache_dir=tmp_path)
    torch.testing.assert_close(direct.relationship, direct_relationship(torch.softmax(logits, 1), labels))
    assert model.calls == 2 * calls
    again = CategoryRelationship.from_loader(model, loader, "direct", cache_dir=tmp_path)
    assert model.calls == 2 * calls  # cache hit: the model did not run
    torch.testing.assert_close(again.relationship, direct.relationship)

    rev = CategoryRelationship.from_loader(model, loader, "reverse", cache_dir=tmp_path, l2_grid=[1e-2])
    torch.testing.assert_close(rev.relationship, reverse_relationship(logits, labels, inputs="logits", l2_grid=[1e-2]))
    assert model.calls == 3 * calls  # another method is another entry
    with torch.no_grad():
        model.inner.weight.mul_(2)  # a changed model recomputes
    CategoryRelationship.from_loader(model, loader, "direct", cache_dir=tmp_path)
    assert model.calls == 4 * calls
    CategoryRelationship.from_loader(model, _loader(seed=1), "direct", cache_dir=tmp_path)  # changed data
    assert model.calls == 5 * calls
    assert len(list(tmp_path.glob("relationship-*.pt"))) == 4
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_bad_input():
    p = torch.softmax(torch.randn(6, 4), 1)
    with pytest.raises(ValueError, match=r"target class\(es\) \[1\] have no sample"):
        direct_relationship(p, torch.tensor([0, 0, 2, 2, 0, 2]))
    with pytest.raises(ValueError, match="out of range for num_target_classes=2"):
        direct_relationship(p, torch.tensor([0, 1, 2, 0, 1, 2]), num_target_classes=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        direct_relationship(p, torch.tensor([0, -1, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="has 6 rows but there are 5 target labels"):
        direct_relationship(p, torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="1-D integer"):
        direct_relationship(p, torch.zeros(6))
    with pytest.raises(ValueError, match="pass inputs='logits'"):
        reverse_relationship(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="inputs must be"):
        reverse_relationship(p, torch.tensor([0, 1, 0, 1, 0, 1]), inputs="probs")
    with pytest.raises(ValueError, match="no class has two or more samples"):
        reverse_relationship(p[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="method must be"):
        CategoryRelationship.from_loader(nn.Linear(4, 6), _loader(), "inverse")
    with pytest.raises(ValueError, match="same shape"):
        co_tuning_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="sum 1"):
        CategoryRelationship(torch.ones(2, 3))


def test_direct_relationship_checks_probabilities_or_takes_logits():
    """issue 9 #9: raw logits (rows summing to 4.5, 12.3 ...) were averaged as if they were probabilities."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(FineregError, match="source probabilities must be rows of non-negative numbers summing to 1"):
        direct_relationship(logits, labels)
    from_logits = direct_relationship(logits, labels, inputs="logits")
    torch.testing.assert_close(from_logits, direct_relationship(torch.softmax(logits, 1), labels))
    with pytest.raises(FineregError, match="inputs must be one of 'probabilities', 'logits'"):
        direct_relationship(logits, labels, inputs="scores")
