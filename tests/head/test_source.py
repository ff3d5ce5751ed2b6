"""finereg.head._source: the classifier split (real torchvision VGG / ConvNeXt / ResNet and timm models) and the
pass of a pretrained model over the target data."""

import pytest
import torch
from torch import nn

from finereg._checks import FineregError, FineregTypeError
from finereg.head._source import classifier_name, source_outputs, split_classifier

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def _check_split(model, expected_name, x, features):
    model.eval()
    with torch.no_grad():
        before = model(x)
    original_head = model.get_submodule(expected_name)
    backbone, head, name = split_classifier(model)
    assert name == expected_name and head is original_head and isinstance(head, nn.Linear)
    with torch.no_grad():
        f = backbone(x)
        torch.testing.assert_close(head(f), before)  # model(x) == head(backbone(x))
    assert f.shape == (x.shape[0], features) == (x.shape[0], head.in_features)
    assert isinstance(backbone.get_submodule(name), nn.Identity)


@pytest.fixture(scope="module")
def vgg():
    return tv.models.vgg11(weights=None, num_classes=7)


def test_torchvision_vgg_keeps_its_pretrained_mlp_in_the_backbone(vgg, one_thread):
    """VGG's classifier is fc6 → ReLU → Dropout → fc7 → ReLU → Dropout → fc8: only fc8 is the head; fc6 and fc7 are
    pretrained feature layers (4096-d features, as timm's VGG gives with its pre-logits)."""
    _check_split(vgg, "classifier.6", torch.randn(2, 3, 32, 32), 4096)
    assert isinstance(vgg.classifier[0], nn.Linear) and vgg.classifier[0].out_features == 4096  # kept


def test_torchvision_convnext_keeps_its_final_norm(one_thread):
    model = tv.models.convnext_tiny(weights=None, num_classes=5)
    _check_split(model, "classifier.2", torch.randn(2, 3, 32, 32), 768)
    assert type(model.classifier[0]).__name__ == "LayerNorm2d"  # the pretrained norm stays in the backbone


def test_torchvision_resnet(one_thread):
    _check_split(tv.models.resnet18(weights=None, num_classes=9), "fc", torch.randn(2, 3, 32, 32), 512)


@pytest.mark.parametrize(
    "arch, size",
    [("convnext_atto", 32), ("vit_tiny_patch16_224", 224), ("resnet10t", 32), ("mobilenetv3_small_050", 32)],
)
def test_timm_models_split_where_get_classifier_points(arch, size, one_thread):
    model = timm.create_model(arch, pretrained=False, num_classes=6)
    expected_head = model.get_classifier()
    name = classifier_name(model)
    assert model.get_submodule(name) is expected_head  # timm's own notion of the head
    _check_split(model, name, torch.randn(2, 3, size, size), expected_head.in_features)


def test_split_by_name_and_errors():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    assert classifier_name(model) == "2.1"
    _, head, name = split_classifier(model, "2")
    assert name == "2" and isinstance(head, nn.Sequential) and isinstance(model[2], nn.Identity)
    with pytest.raises(FineregError, match="has no nn.Linear classifier head"):
        classifier_name(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(KeyError, match="no submodule named '1'; available: '0'"):
        split_classifier(nn.Sequential(nn.Linear(2, 2)), "1")


def test_source_outputs_in_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9)).train()
    x, y = torch.randn(10, 3), torch.arange(10) % 3
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = source_outputs(model, batches)
    torch.testing.assert_close(got.outputs, model[0](x).detach())  # dropout off
    assert torch.equal(got.labels, y) and got.indices is None and model.training
    got = source_outputs(model, [(x[:4], y[:4], torch.tensor([3, 2, 1, 0]))], forward=model[0])
    assert got.indices.tolist() == [3, 2, 1, 0]
    assert source_outputs(model, [x]).labels is None  # plain tensors: no labels


def test_source_outputs_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(FineregError, match="yielded no batches"):
        source_outputs(model, [])
    with pytest.raises(FineregTypeError, match="batch 0 must be a tensor of inputs or a tuple"):
        source_outputs(model, [{"x": torch.randn(2, 3)}])
    with pytest.raises(FineregError, match="third item of batch 1 must be the 1-D integer sample indices"):
        source_outputs(model, [torch.randn(2, 3), (torch.randn(2, 3), None, torch.tensor([0.5, 1.5]))])
    with pytest.raises(FineregTypeError, match="model must be an nn.Module"):
        source_outputs(lambda x: x, [torch.randn(2, 3)])
