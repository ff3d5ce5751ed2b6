"""finereg.compat.tllib.co_tuning: CoTuningLoss and Relationship give tllib's numbers; the cache; a class without
samples gets tllib's NaN row with a warning; the classifier trains its source head."""

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg._checks import FineregWarning
from finereg.compat.tllib import co_tuning
from finereg.compat.tllib.co_tuning import Relationship
from finereg.head.co_tuning import direct_relationship


def test_co_tuning_loss_golden(golden):
    case = golden["co_tuning_loss"]
    x = case["input"].clone().requires_grad_(True)
    value = co_tuning.CoTuningLoss()(x, case["target"])
    value.backward()
    torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, case["grad"], rtol=1e-6, atol=1e-8)


def _golden_loader(case, batch_size=7):
    """Inputs are log-probabilities and the classifier is the identity, so softmax(classifier(x)) is the golden
    source_probabilities."""
    x = case["source_probabilities"].log()
    return DataLoader(TensorDataset(x, case["target_labels"]), batch_size=batch_size)


def test_relationship_golden_and_cache(golden, tmp_path):
    case = golden["relationship_direct"]
    rel = co_tuning.Relationship(_golden_loader(case), nn.Identity(), "cpu")
    assert isinstance(rel.relationship, np.ndarray) and rel.relationship.shape == (4, 7)
    np.testing.assert_allclose(rel.relationship, case["relationship"].numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(rel[2], case["relationship"][2].numpy(), rtol=1e-6, atol=1e-8)
    labels = torch.tensor([3, 0, 3])
    np.testing.assert_allclose(rel[labels], case["relationship"][labels].numpy(), rtol=1e-6, atol=1e-8)
    # tllib's own entry point on arrays
    direct = rel.get_category_relationship(case["source_probabilities"].numpy(), case["target_labels"].numpy())
    np.testing.assert_allclose(direct, case["relationship"].numpy(), rtol=1e-6, atol=1e-8)

    cache = tmp_path / "relationship"  # no .npy suffix: tllib would have written relationship.npy
    first = Relationship(_golden_loader(case), nn.Identity(), "cpu", cache=str(cache))
    assert cache.is_file() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been used")

    second = Relationship(_golden_loader(case), Boom(), "cpu", cache=str(cache))
    np.testing.assert_array_equal(second.relationship, first.relationship)


def test_relationship_of_a_subset_with_classes_without_samples_warns_and_fills_nan_rows():
    """tllib's co_tuning.py -sc N trains on a random subset, where some classes may have no sample: tllib's
    relationship gets NaN rows for them (numpy's mean of an empty slice) and training never reads them."""
    x = torch.randn(4, 3)
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 2, 2, 0])), batch_size=2)
    with pytest.warns(FineregWarning, match=r"target class\(es\) \[1\] have no sample"):
        rel = Relationship(loader, nn.Identity(), "cpu")
    assert rel.relationship.shape == (3, 3) and np.isnan(rel.relationship[1]).all()
    probs = torch.softmax(x, 1)
    np.testing.assert_allclose(rel.relationship[[0, 2]], torch.stack([probs[[0, 3]].mean(0), probs[[1, 2]].mean(0)]))
    with pytest.raises(ValueError, match=r"target class\(es\) \[1\] have no sample"):
        direct_relationship(probs, torch.tensor([0, 2, 2, 0]))  # the native API stays strict


class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.out_features = 4


def test_co_tuning_classifier_trains_source_head():
    head_source = nn.Linear(4, 10)
    groups = co_tuning.Classifier(Backbone(), 3, head_source).get_parameters(base_lr=1.0)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head_source.parameters()}  # at 0.1·base_lr
    assert groups[1]["lr"] == 0.1
