"""LP-FT's stage 1 (fit_linear_probe): scikit-learn's multinomial logistic regression on the official scalar
standardization, λ chosen on validation, the head copied into a model; batchnorm_eval_ for stage 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import finereg
from finereg._checks import FineregError
from finereg.lp_ft import batchnorm_eval_, fit_linear_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per_class=40, classes=4, dim=10, spread=1.0, seed=0, shift=3.0):
    """Gaussian clusters around random centres, features with a non-zero mean and scale (as a backbone's)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    return 5.0 * x + shift, y


def test_probe_equals_scikit_learn_at_the_chosen_strength():
    """sklearn's objective C·Σ CE + ½‖W‖² (intercept unpenalized) on the standardized features is ours with
    λ = 1/(C·n); the weights, mapped back to raw features, agree."""
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression
    x, y = clusters(spread=3.0)
    xv, yv = clusters(spread=3.0, seed=1)
    probe = fit_linear_probe(x, y, xv, yv, l2_grid=[1e-2])
    mu, sigma = x.mean(), x.std(unbiased=False)
    clf = LogisticRegression(C=1 / (1e-2 * len(x)), tol=1e-12, max_iter=10_000)
    clf.fit(((x - mu) / sigma).numpy(), y.numpy())
    w = torch.from_numpy(clf.coef_) / sigma
    b = torch.from_numpy(clf.intercept_) - w @ (mu * torch.ones(x.shape[1], dtype=torch.float64))
    torch.testing.assert_close(probe.weight, w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probe.bias, b, rtol=1e-4, atol=1e-5)


def test_fit_quality_on_separable_clusters():
    x, y = clusters()
    xv, yv = clusters(seed=1)
    xt, yt = clusters(seed=2)
    probe = fit_linear_probe(x, y, xv, yv)
    assert probe.val_accuracy >= 0.95
    assert float((probe.logits(xt).argmax(1) == yt).double().mean()) >= 0.95


def test_strength_is_chosen_on_validation_ties_to_the_stronger():
    """Few noisy samples in many dimensions: the path's validation accuracies pick the λ (first best from the
    strongest); the choice is the argmax of the reported path."""
    x, y = clusters(n_per_class=6, dim=60, spread=6.0)
    xv, yv = clusters(n_per_class=50, dim=60, spread=6.0, seed=1)
    grid = [1e-4, 1e-2, 1.0, 10.0]
    probe = fit_linear_probe(x, y, xv, yv, l2_grid=grid)
    path = probe.path
    assert [p["l2"] for p in path] == sorted(grid, reverse=True)
    best = max(p["val_accuracy"] for p in path)
    assert probe.l2 == next(p["l2"] for p in path if p["val_accuracy"] == best)
    nll = fit_linear_probe(x, y, xv, yv, l2_grid=grid, select="nll")
    assert nll.l2 == min(path, key=lambda p: p["val_nll"])["l2"]
    assert len({p["val_nll"] for p in path}) == len(grid)  # the strengths do give different probes


def test_without_validation_a_stratified_holdout_chooses_and_the_probe_is_refit():
    x, y = clusters()
    probe = fit_linear_probe(x, y, l2_grid=[1e-3, 1e-1])
    assert probe.l2 in (1e-3, 1e-1)
    again = fit_linear_probe(x, y, x, y, l2_grid=[probe.l2])  # the refit: all data at the chosen λ
    torch.testing.assert_close(probe.weight, again.weight, rtol=1e-5, atol=1e-7)


def test_head_loading_gives_the_probe_logits():
    x, y = clusters()
    probe = fit_linear_probe(x, y, *clusters(seed=1), normalize=False)
    head = nn.Linear(10, 4).double()
    probe.load_into(head)
    with torch.no_grad():
        torch.testing.assert_close(head(x), probe.logits(x))
        torch.testing.assert_close(probe.to_linear()(x), probe.logits(x))
    with pytest.raises(FineregError, match="head has shape"):
        probe.load_into(nn.Linear(10, 5))


def test_batchnorm_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4)).train()
    assert batchnorm_eval_(model) == 2
    assert model.training and not model[1].training and not model[3].training


def test_errors():
    x, y = clusters()
    with pytest.raises(FineregError, match="features must be"):
        fit_linear_probe(x[0], y)
    with pytest.raises(FineregError, match="labels must be"):
        fit_linear_probe(x, y.double())
    with pytest.raises(FineregError, match="give both"):
        fit_linear_probe(x, y, x)
    with pytest.raises(FineregError, match="l2_grid"):
        fit_linear_probe(x, y, l2_grid=[])
    with pytest.raises(FineregError, match="select must be"):
        fit_linear_probe(x, y, select="auc")
    assert finereg.fit_linear_probe is fit_linear_probe


class Doubled(nn.Module):
    """A parametrization with a right_inverse: weight = 2·original."""

    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


def test_load_into_writes_through_an_invertible_parametrization():
    """The weight of a parametrized head was left unloaded (the copy went into a computed tensor)."""
    from torch.nn.utils import parametrize

    x, y = clusters()
    probe = fit_linear_probe(x, y, *clusters(seed=1))
    head = nn.Linear(10, 4).double()
    parametrize.register_parametrization(head, "weight", Doubled())
    probe.load_into(head)
    torch.testing.assert_close(head.weight, probe.weight)
    with torch.no_grad():
        torch.testing.assert_close(head(x), probe.logits(x))


@pytest.mark.parametrize(
    "reparam, match",
    [
        (lambda h: finereg.freeze(h, "weight", [0]), r"head\.weight is parametrized \(PartialFreeze\).*unfreeze"),
        (lambda h: finereg.freeze(h, "bias", [1]), r"head\.bias is parametrized \(PartialFreeze\)"),
        (lambda h: finereg.standardize(h, linear=True), r"WeightStandardization.*mean 0.*bake"),
    ],
    ids=["frozen-weight", "frozen-bias", "standardized"],
)
def test_load_into_a_frozen_or_standardized_head_is_refused_and_writes_nothing(reparam, match):
    x, y = clusters()
    probe = fit_linear_probe(x, y, *clusters(seed=1))
    head = nn.Linear(10, 4).double()
    reparam(head)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(FineregError, match=match):
        probe.load_into(head)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_features_and_labels_are_named():
    """NaN features were reported as constant ones, NaN validation features chose λ on NaN scores, out-of-range
    validation labels reached torch's IndexError, a single class was accepted."""
    x, y = clusters()
    xv, yv = clusters(seed=1)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(FineregError, match=r"features hold NaN or inf in 1 row\(s\) \(first: \[3\]\)"):
        fit_linear_probe(bad, y, xv, yv)
    bad_v = xv.clone()
    bad_v[5:7, 0] = float("inf")
    with pytest.raises(FineregError, match=r"val_features hold NaN or inf in 2 row\(s\)"):
        fit_linear_probe(x, y, bad_v, yv)
    with pytest.raises(FineregError, match=r"val_labels must be in 0\.\.3 like labels, got range \[0, 4\]"):
        fit_linear_probe(x, y, xv, torch.where(yv == 3, 4, yv))
    with pytest.raises(FineregError, match=r"labels hold a single class \(2\).*num_classes="):
        fit_linear_probe(x, torch.full_like(y, 2))
    assert fit_linear_probe(x, torch.full_like(y, 2), xv, yv, num_classes=4).weight.shape == (4, 10)


def test_batchnorm_eval_of_a_non_module_is_a_clear_error():
    from finereg._checks import FineregTypeError

    with pytest.raises(FineregTypeError, match="model must be an nn.Module, got str"):
        batchnorm_eval_("model")
