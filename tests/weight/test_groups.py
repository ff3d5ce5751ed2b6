"""Weight groups: matrix views (one row per output unit), name/glob resolution, joins, gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from finereg.reparam.freeze import freeze
from finereg.weight.groups import WeightGroup, matrix_to_weight, matrix_view, weight_matrix
from finereg.weight.orthogonal import Orthogonality


def tiny_resnet():
    def block(c_in, c_out, down):
        b = nn.Module()
        b.conv1 = nn.Conv2d(c_in, c_out, 1, bias=False)
        b.bn1 = nn.BatchNorm2d(c_out)
        b.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        if down:
            b.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        return b

    m = nn.Module()
    m.conv1 = nn.Conv2d(3, 4, 3)
    m.layer1 = nn.Sequential(block(4, 4, False), block(4, 4, False))
    m.layer2 = nn.Sequential(block(4, 8, True), block(8, 8, False))
    m.fc = nn.Linear(8, 5)
    return m


# -- matrix views ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [nn.Conv1d(6, 4, 3), nn.Conv2d(6, 4, (3, 2), groups=2), nn.Conv3d(6, 4, 2)])
def test_conv_rows_are_output_channels(conv):
    w = conv.weight
    m = matrix_view(w, conv)
    assert m.shape == (w.shape[0], w[0].numel())
    for o in range(w.shape[0]):
        assert torch.equal(m[o], w[o].flatten())


def test_linear_view_is_the_weight():
    lin = nn.Linear(5, 3)
    assert torch.equal(weight_matrix(lin), lin.weight)


def test_conv_transpose_explicit_example():
    # ConvTranspose2d(4 → 6, groups=2): weight (in=4, out/groups=3, 2, 2); in_g = 2, out_g = 3.
    ct = nn.ConvTranspose2d(4, 6, 2, groups=2)
    w = ct.weight
    m = matrix_view(w, ct)
    assert m.shape == (6, 2 * 2 * 2)
    # output unit 4 = group 1, j = 1: input channels 2..3, slice j = 1
    assert torch.equal(m[4], w[2:4, 1].flatten())
    assert torch.equal(m[0], w[0:2, 0].flatten())
    assert torch.equal(m[5], w[2:4, 2].flatten())
    assert torch.equal(matrix_to_weight(m, w, ct), w)


@pytest.mark.parametrize(
    "ct", [nn.ConvTranspose1d(4, 6, 3, groups=2), nn.ConvTranspose2d(6, 4, 3, groups=2), nn.ConvTranspose3d(3, 5, 2)]
)
def test_conv_transpose_row_drives_exactly_its_output_channel(ct):
    """Changing row o of the matrix view changes output channel o of the layer, and nothing else."""
    ct = ct.double()
    x = torch.randn((2, ct.in_channels) + (4,) * (ct.weight.dim() - 2), dtype=torch.float64)
    y0 = ct(x)
    for o in range(ct.out_channels):
        m = matrix_view(ct.weight.detach(), ct).clone()
        m[o] += torch.randn_like(m[o])
        w = matrix_to_weight(m, ct.weight, ct)
        conv_t = getattr(F, f"conv_transpose{ct.weight.dim() - 2}d")
        y = conv_t(x, w, ct.bias, ct.stride, ct.padding, ct.output_padding, ct.groups, ct.dilation)
        changed = (y - y0).abs().flatten(2).amax(-1).amax(0) > 1e-12
        assert changed.tolist() == [c == o for c in range(ct.out_channels)]


def test_view_of_1d_tensor_is_an_error():
    with pytest.raises(ValueError, match="at least 2 dims"):
        matrix_view(torch.zeros(3))


# -- resolution ----------------------------------------------------------------------------------------------
def test_glob_patterns_and_names_resolve_in_order():
    m = tiny_resnet()
    g = WeightGroup("layer*.*.conv2", m, axis=None)
    assert g.names == ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.1.conv2"]
    # "layer2.*" keeps 2-D+ weights: convs and the downsample conv, never BatchNorm
    g2 = WeightGroup("layer2.*", m, axis=None)
    assert g2.names == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2"]
    # mixing module objects, names and patterns; duplicates count once
    g3 = WeightGroup([m.fc, "layer1.0.conv1", "layer1.*.conv1"], m, axis=None)
    assert g3.names == ["fc", "layer1.0.conv1", "layer1.1.conv1"]
    assert g3.members[0].module is m.fc


def test_wrapped_model_and_prefixed_names():
    m = tiny_resnet()
    wrapped = nn.DataParallel(m)  # on CPU: just a wrapper adding the "module." prefix
    g = WeightGroup(["module.layer1.0.conv1", "layer1.1.*"], wrapped, axis=None)
    assert g.names == ["layer1.0.conv1", "layer1.1.conv1", "layer1.1.conv2"]
    assert g.members[0].module is m.layer1[0].conv1


def test_clear_errors_for_bad_members():
    m = tiny_resnet()
    with pytest.raises(KeyError, match="did you mean.*layer1.0.conv2"):
        WeightGroup("layer1.0.convv2", m)
    with pytest.raises(KeyError, match="layer3.*did you mean|no module"):
        WeightGroup("layer3.*.conv2", m)
    with pytest.raises(ValueError, match="pass model="):
        WeightGroup("layer1.0.conv1")
    with pytest.raises(ValueError, match="at least 2 dims"):
        WeightGroup("layer1.0.bn1", m)
    with pytest.raises(KeyError, match="weight"):
        WeightGroup(m.fc, param="wieght")
    with pytest.raises(ValueError, match="axis must be"):
        WeightGroup(m.fc, axis=2)
    with pytest.raises(TypeError, match="member 0"):
        WeightGroup([3])
    with pytest.raises(ValueError, match="at least one member"):
        WeightGroup([])


# -- joining -------------------------------------------------------------------------------------------------
def test_join_rows_like_the_seeds_split_layers():
    parts = [nn.Conv2d(1024, k, 1, bias=False) for k in (3, 3, 4)]
    g = WeightGroup(parts)  # axis=0
    assert g.shape == (10, 1024)
    expected = torch.cat([p.weight.reshape(p.out_channels, -1) for p in parts])
    assert torch.equal(g.matrix(), expected)
    assert g.row_slices() == [slice(0, 3), slice(3, 6), slice(6, 10)]


def test_join_columns_and_mismatch_errors():
    a, b = nn.Linear(5, 4), nn.Conv2d(2, 4, 3)
    g = WeightGroup([a, b], axis=1)
    assert g.shape == (4, 5 + 18)
    assert torch.equal(g.matrix(), torch.cat([a.weight, b.weight.reshape(4, -1)], 1))
    with pytest.raises(ValueError, match=r"different numbers of columns.*axis=1.*separate groups"):
        WeightGroup([a, b], axis=0)
    with pytest.raises(ValueError, match=r"different numbers of rows.*axis=0"):
        WeightGroup([a, nn.Linear(5, 3)], axis=1)
    with pytest.raises(ValueError, match="dtype"):
        WeightGroup([a, nn.Linear(5, 4).double()])
    sep = WeightGroup([a, b], axis=None)
    assert sep.shape == [(4, 5), (4, 18)]
    with pytest.raises(ValueError, match="not joined"):
        sep.matrix()


def test_gradients_reach_every_member():
    lin, conv, ct = nn.Linear(6, 2).double(), nn.Conv2d(6, 3, 1).double(), nn.ConvTranspose1d(2, 4, 3).double()
    g = WeightGroup([lin, conv, ct])  # (2 + 3 + 4) × 6
    assert g.shape == (9, 6)
    target = torch.randn(9, 6, dtype=torch.float64)
    (g.matrix() * target).sum().backward()
    rows = g.row_slices()
    assert torch.equal(lin.weight.grad, target[rows[0]])
    assert torch.equal(conv.weight.grad.reshape(3, 6), target[rows[1]])
    assert torch.equal(ct.weight.grad, matrix_to_weight(target[rows[2]], ct.weight, ct))


def test_members_see_parametrized_weights():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    lin = nn.Linear(3, 2)
    g = WeightGroup(lin)
    before = g.matrix().detach().clone()
    parametrize.register_parametrization(lin, "weight", Double())
    assert torch.equal(g.matrix(), 2 * before)


def _conv_data(n_batches=4, batch=4):
    g = torch.Generator().manual_seed(11)
    d = torch.float64
    return [
        (torch.randn(batch, 1024, 7, 7, generator=g, dtype=d), torch.randn(batch, 10, 7, 7, generator=g, dtype=d))
        for _ in range(n_batches)
    ]


def test_a_group_of_three_layers_trains_like_one_layer_with_frozen_rows(one_thread):
    """One layer per group of filters (whole layers frozen, the Keras workaround) and one layer with frozen rows
    train identically under a penalty over the group."""
    single = nn.Conv2d(1024, 10, 1, bias=False).double()
    parts = [nn.Conv2d(1024, k, 1, bias=False).double() for k in (3, 3, 4)]
    with torch.no_grad():
        for p, rows in zip(parts, (slice(0, 3), slice(3, 6), slice(6, 10))):
            p.weight.copy_(single.weight[rows])
    split_group = WeightGroup(parts)  # one 10 × 1024 matrix over 3 layers
    pen_split = Orthogonality(split_group, factor=0.1)
    pen_single = Orthogonality(WeightGroup(single), factor=0.1)
    torch.testing.assert_close(pen_split(), pen_single(), rtol=1e-12, atol=0)

    # gradients reach every layer and equal the single layer's rows
    pen_split().backward()
    pen_single().backward()
    for p, rows in zip(parts, split_group.row_slices()):
        torch.testing.assert_close(p.weight.grad, single.weight.grad[rows], rtol=1e-10, atol=1e-14)
    single.weight.grad = None
    for p in parts:
        p.weight.grad = None

    # train: Keras-style split with layer 2 frozen as a whole vs. the single layer with rows 3..5 frozen
    parts[1].requires_grad_(False)
    freeze(single, "weight", [3, 4, 5])
    opt_split = torch.optim.SGD([parts[0].weight, parts[2].weight], lr=0.1, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    for x, y in _conv_data(3):
        for loss_fn, opt in (
            (lambda x=x, y=y: F.mse_loss(torch.cat([p(x) for p in parts], 1), y) + pen_split(), opt_split),
            (lambda x=x, y=y: F.mse_loss(single(x), y) + pen_single(), opt_single),
        ):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    torch.testing.assert_close(split_group.matrix(), single.weight.reshape(10, -1), rtol=1e-9, atol=1e-12)
