"""BatchNorm → GroupNorm: channel counts, affine parameters, eps, dtype and mode kept; outputs equal a
GroupNorm built by hand; clear errors (non-divisible channels suggest divisors, nothing half-converted)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finereg.reparam.norm import batchnorm_to_groupnorm

D = torch.float64


def net():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, eps=1e-3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 12),
        nn.BatchNorm1d(12, affine=False),
        nn.Linear(12, 2),
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model


def test_converts_every_batchnorm_keeping_parameters():
    model = net()
    bn1, bn2 = model[1], model[3][1]
    report = batchnorm_to_groupnorm(model, num_groups=4)
    assert report.names == ["1", "3.1", "6"]
    assert "BatchNorm2d(16) -> GroupNorm(4, 16)" in str(report)
    gn1, gn2, gn3 = model[1], model[3][1], model[6]
    assert all(isinstance(m, nn.GroupNorm) for m in (gn1, gn2, gn3))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert (gn1.num_channels, gn1.num_groups, gn1.eps) == (8, 4, 1e-3)
    assert (gn3.num_channels, gn3.affine, gn3.eps) == (12, False, 1e-5)
    assert torch.equal(gn2.weight, bn2.weight) and torch.equal(gn2.bias, bn2.bias)
    assert gn1.weight.dtype == D and gn1.training

    x = torch.randn(5, 3, 6, 6, dtype=D)
    h = model[0](x)
    ref = F.group_norm(h, 4, bn1.weight, bn1.bias, 1e-3)  # the definition, per sample and group
    torch.testing.assert_close(model[1](h), ref)
    grouped = h.reshape(5, 4, -1)
    manual = (grouped - grouped.mean(-1, keepdim=True)) / torch.sqrt(
        grouped.var(-1, unbiased=False, keepdim=True) + 1e-3
    )
    torch.testing.assert_close(model[1](h), manual.reshape_as(h) * bn1.weight[:, None, None] + bn1.bias[:, None, None])
    model(x).sum().backward()  # trains
    assert model[3][1].weight.grad is not None


def test_outputs_do_not_depend_on_the_batch():
    model = net().eval()
    batchnorm_to_groupnorm(model, channels_per_group=2, num_groups=None, exclude="6")
    x = torch.randn(4, 3, 6, 6, dtype=D)
    full = model[:4](x)
    torch.testing.assert_close(model[:4](x[:1]), full[:1])
    assert isinstance(model[6], nn.BatchNorm1d) and model[1].num_groups == 4 and model[3][1].num_groups == 8


def test_include_and_mode_and_syncbn():
    model = net().eval()
    report = batchnorm_to_groupnorm(model, num_groups=2, include="3.*", eps=1e-4)
    assert report.names == ["3.1"] and model[3][1].eps == 1e-4 and not model[3][1].training
    assert isinstance(model[1], nn.BatchNorm2d)
    sync = nn.Sequential(nn.Conv2d(3, 6, 1), nn.SyncBatchNorm(6))
    batchnorm_to_groupnorm(sync, num_groups=3)
    assert isinstance(sync[1], nn.GroupNorm) and sync[1].num_groups == 3


def test_torchvision_resnet_with_group_norm_runs():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=3)
    report = batchnorm_to_groupnorm(model, 32)
    assert len(report) == 20
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)  # batch of 1 is fine without BatchNorm


def test_errors_and_nothing_half_converted():
    model = net()
    with pytest.raises(
        ValueError,
        match=r"^1 \(BatchNorm2d\) has 8 channels, not divisible by num_groups=3; "
        r"group counts that divide 8 near 3: \[1, 2, 4, 8\]",
    ):
        batchnorm_to_groupnorm(model, num_groups=3)
    with pytest.raises(ValueError, match=r"^6 \(BatchNorm1d\) has 12 channels, not divisible by num_groups=8"):
        batchnorm_to_groupnorm(model, num_groups=8)
    assert isinstance(model[1], nn.BatchNorm2d)  # layers before it (8, 16 channels: divisible) not converted
    with pytest.raises(ValueError, match="channels_per_group=5; divisors of 8 near it"):
        batchnorm_to_groupnorm(model, num_groups=None, channels_per_group=5)
    with pytest.raises(ValueError, match="exactly one of num_groups and channels_per_group"):
        batchnorm_to_groupnorm(model, num_groups=4, channels_per_group=2)
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1, got 0"):
        batchnorm_to_groupnorm(model, num_groups=0)
    with pytest.raises(KeyError, match=r"include pattern '3\.2' matches no module.*did you mean.*'3\.1'"):
        batchnorm_to_groupnorm(model, 2, include="3.2")
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\) but no BatchNorm layer"):
        batchnorm_to_groupnorm(model, 2, include="0")
    with pytest.raises(ValueError, match="model is itself a BatchNorm"):
        batchnorm_to_groupnorm(nn.BatchNorm2d(4), 2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        batchnorm_to_groupnorm([nn.BatchNorm2d(4)], 2)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 3
