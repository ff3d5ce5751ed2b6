"""DELTA's attention classifier: only the new head trains, on frozen pretrained features; bad input."""

import pytest
import torch
from torch import nn

from finereg.feature.attention_classifier import train_attention_classifier


# ---------------------------------------------------------------- attention classifier ----
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_train_attention_classifier_freezes_backbone():
    net = _Net().train()
    net.backbone[0].weight.requires_grad_(True)
    x = torch.randn(48, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head_before = net.head.weight.clone()
    losses = train_attention_classifier(net, "head", data, epochs=8, lr=0.1)
    assert len(losses) == 8 and losses[-1] < losses[0]
    for k, v in net.backbone.state_dict().items():  # weights and BatchNorm running stats untouched
        assert torch.equal(v, backbone_before[k]), k
    assert not torch.equal(net.head.weight, head_before)
    assert net.training and net.backbone[1].training  # modes restored
    assert all(p.requires_grad for p in net.parameters())  # flags restored
    assert net.backbone[0].weight.grad is None


def test_train_attention_classifier_errors():
    net = _Net()
    data = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(KeyError, match="did you mean"):
        train_attention_classifier(net, "haed", data)
    with pytest.raises(ValueError, match="not a submodule"):
        train_attention_classifier(net, nn.Linear(8, 3), data)
    with pytest.raises(ValueError, match="no parameters"):
        train_attention_classifier(net, "backbone.2", data)
    with pytest.raises(TypeError, match="one-pass iterator"):
        train_attention_classifier(net, "head", iter(data), epochs=2)
    with pytest.raises(ValueError, match="epochs"):
        train_attention_classifier(net, "head", data, epochs=0)
