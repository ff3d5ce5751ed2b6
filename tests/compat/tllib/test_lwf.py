"""finereg.compat.tllib.lwf: tllib's Classifier (signature, pool, heads, state_dict keys) and
collect_pretrain_labels."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg.compat.tllib import lwf


class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.out_features = 4


def test_lwf_classifier_tllib_signature():
    head_source = nn.Linear(4, 10)
    model = lwf.Classifier(Backbone(), 3, head_source)
    x = torch.randn(2, 3, 8, 8)
    y_s, y_t = model(x)
    f = model.backbone(x).mean((2, 3))  # the default pool: global average + flatten
    torch.testing.assert_close(y_s, head_source(f))
    assert y_t.shape == (2, 3) and model.features_dim == 4
    model.eval()
    assert model(x).shape == (2, 3)
    groups = model.get_parameters(base_lr=0.1)  # the layouts: tests/test_lr_policy.py
    params = {id(p) for g in groups for p in g["params"]}
    assert not params & {id(p) for p in head_source.parameters()}  # tllib leaves the source head out
    bottled = lwf.Classifier(Backbone(), 3, nn.Linear(4, 10), bottleneck=nn.Linear(4, 6), bottleneck_dim=6)
    assert bottled.head_target.in_features == 6 and bottled(x)[1].shape == (2, 3)
    keys = set(lwf.Classifier(Backbone(), 3, nn.Linear(4, 10)).state_dict())
    assert {"backbone.0.weight", "head_source.weight", "head_target.weight", "head_target.bias"} <= keys
    with pytest.raises(ValueError, match="bottleneck_dim must be > 0"):
        lwf.Classifier(Backbone(), 3, nn.Linear(4, 10), bottleneck=nn.Linear(4, 6))


def test_collect_pretrain_labels_in_order():
    model = nn.Linear(3, 5)
    x = torch.randn(9, 3)
    out = lwf.collect_pretrain_labels(DataLoader(TensorDataset(x, torch.zeros(9)), batch_size=4), model, "cpu")
    torch.testing.assert_close(out, model(x).detach())
