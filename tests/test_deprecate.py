"""Renamed public arguments keep working for one minor version (issue 17 item 23; README, Conventions): finereg
0.2's renames (``alpha`` / ``coef`` → ``factor``, ``T`` → ``temperature``, ``bi_tuning_loss``'s arguments) accept the
old name with a ``FutureWarning`` naming the new one and give the same result; passing both is a clear error."""

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import finereg
from finereg._checks import FineregTypeError
from finereg._deprecate import renamed
from finereg.head.bi_tuning import BiTuningClassifier
from finereg.weight.orthogonal import create_penalty


def _old(call, old, new):
    """``call()`` under the old name: its FutureWarning names the new one and the version that removes the old."""
    with pytest.warns(FutureWarning, match=rf"'{old}' is now '{new}' \(renamed in finereg 0\.2\).*until finereg 0\.3"):
        return call()


def test_kd_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    new = finereg.kd_loss(s, t, temperature=2.0)
    assert torch.equal(_old(lambda: finereg.kd_loss(s, t, T=2.0), "T", "temperature"), new)
    module = _old(lambda: finereg.KnowledgeDistillation(T=2.0), "T", "temperature")
    assert module.temperature == 2.0 and torch.equal(module(s, t), new)
    with pytest.warns(FutureWarning, match=r"KnowledgeDistillation\.T is now \.temperature"):
        assert module.T == 2.0
    with pytest.raises(FineregTypeError, match=r"kd_loss\(\) got both 'T' .* and 'temperature': pass temperature="):
        finereg.kd_loss(s, t, 2.0, T=3.0)
    with pytest.raises(FineregTypeError, match="got both"):
        finereg.KnowledgeDistillation(T=2.0, temperature=2.0)


def test_bi_tuning_temperature():
    enc = BiTuningClassifier(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), 3, 4, features_dim=5)
    model = _old(lambda: finereg.BiTuning(enc, K=2, T=0.1), "T", "temperature")
    assert model.temperature == 0.1
    with pytest.raises(FineregTypeError, match=r"BiTuning\(\) got both"):
        finereg.BiTuning(enc, None, 3, 2, 0.9, 0.1, T=0.1)


def test_bi_tuning_loss_0_1_form_is_the_whole_objective():
    torch.manual_seed(0)
    y_q, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    logits_z, logits_y = torch.randn(4, 7).log_softmax(1), torch.randn(4, 7).log_softmax(1)
    labels_c = torch.rand(4, 7).softmax(1)
    term = finereg.bi_tuning_loss(logits_z, logits_y, labels_c)
    expected = F.cross_entropy(y_q, labels) + 0.3 * term
    for call in (
        lambda: finereg.bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels, 0.3),
        lambda: finereg.bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels=labels, trade_off=0.3),
    ):
        with pytest.warns(FutureWarning, match=re.escape("is now bi_tuning_loss(logits_z, logits_y, labels_c)")):
            assert torch.equal(call(), expected)
    with pytest.warns(FutureWarning):  # trade_off's default was 1
        old = finereg.bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels)
    assert torch.equal(old, F.cross_entropy(y_q, labels) + term)
    with pytest.raises(FineregTypeError, match="bi_tuning_loss"):
        finereg.bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels, 0.3, 1.0)


def test_weight_penalties_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    new = finereg.L2(model, factor=0.1)()
    assert torch.equal(_old(lambda: finereg.L2(model, alpha=0.1)(), "alpha", "factor"), new)
    with pytest.raises(FineregTypeError, match=r"L2\(\) got both 'alpha'"):
        finereg.L2(model, alpha=0.1, factor=0.1)
    group = finereg.WeightGroup(model[0])
    for cls in (
        finereg.Orthogonality,
        finereg.SoftOrthogonality,
        finereg.DoubleSoftOrthogonality,
        finereg.MutualCoherence,
        finereg.SRIP,
    ):
        torch.manual_seed(1)  # SRIP's power iteration starts from a random vector
        expected = cls(group, factor=0.01)()
        torch.manual_seed(1)
        penalty = _old(lambda cls=cls: cls(group, coef=0.01), "coef", "factor")
        assert torch.equal(penalty(), expected), cls
        with pytest.warns(FutureWarning, match=rf"{cls.__name__}\.coef is now \.factor"):
            assert penalty.coef == 0.01
        with pytest.raises(FineregTypeError, match=rf"{cls.__name__}\(\) got both 'coef'"):
            cls(group, 0.01, coef=0.01)
    fn = lambda w: (w**2).sum()
    expected = finereg.CallablePenalty(fn, group, factor=0.5)()
    assert torch.equal(_old(lambda: finereg.CallablePenalty(fn, group, coef=0.5)(), "coef", "factor"), expected)
    made = _old(lambda: create_penalty("soft_orthogonal", group, coef=0.5), "coef", "factor")
    assert made.factor == 0.5


def test_new_names_and_tllibs_names_do_not_warn():
    enc = BiTuningClassifier(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), 3, 4, features_dim=5)
    from finereg.compat import tllib

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        finereg.kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=2.0)
        finereg.L2(nn.Linear(2, 2), factor=0.1)
        assert tllib.KnowledgeDistillationLoss(T=2.0).T == 2.0  # tllib's own name (compat.tllib)
        assert tllib.BiTuning(enc, None, 3, K=2, T=0.1).T == 0.1


def test_renamed_checks_its_own_arguments():
    with pytest.raises(TypeError, match="has no parameter 'factr'"):

        @renamed(coef="factr", since="0.2")
        def f(factor=1.0):
            return factor

    @renamed(old="new", since="1.4")
    def g(x, new=0):
        return x + new

    with pytest.warns(FutureWarning, match=r"g\(\): the argument 'old' is now 'new' .* until finereg 1\.5"):
        assert g(1, old=2) == 3
    assert g.__wrapped__(1, new=2) == 3 and list(inspect.signature(g).parameters) == ["x", "new"]
