"""LwF: the two-head classifier (any backbone, torchvision, timm), parameter groups, recorded source targets."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg.head.kd import kd_loss
from finereg.head.lwf import IndexedDataset, LwFClassifier, new_head_like, record_source_predictions
from tests.head._util import Counting


def tiny_pretrained(num_source=5):
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, num_source))


def split(model):
    return LwFClassifier(model[:2], model[2], num_classes=3)


def test_forward_modes_and_heads():
    src = tiny_pretrained()
    lwf = split(src)
    x = torch.randn(4, 6)
    y_s, y_t = lwf(x)
    torch.testing.assert_close(y_s, src(x))  # the source head is the pretrained model's own head
    assert y_t.shape == (4, 3)
    lwf.eval()
    out = lwf(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 3)
    torch.testing.assert_close(out, y_t)
    assert isinstance(lwf(x, return_both=True), tuple)
    torch.testing.assert_close(lwf.source_logits(x), src(x))


def test_from_pretrained_torchvision_resnet_keeps_pretrained_outputs():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(weights=None, num_classes=11).eval()
    lwf = LwFClassifier.from_pretrained(model, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    y_s, y_t = lwf(x, return_both=True)
    torch.testing.assert_close(y_s, model(x))
    assert y_t.shape == (2, 4) and isinstance(lwf.backbone.fc, nn.Identity)
    assert isinstance(model.fc, nn.Linear)  # the user's model is untouched (copied)
    assert lwf.head_target.in_features == 512 and lwf.head_source.out_features == 11


def test_from_pretrained_mlp_classifier_keeps_its_hidden_layers_pretrained():
    """MobileNetV3's classifier is Linear → Hardswish → Dropout → Linear: the source head is the last Linear, the
    hidden layer stays in the backbone with its pretrained weights and the target head reads its 1024 features."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v3_small(weights=None, num_classes=9).eval()
    lwf = LwFClassifier.from_pretrained(model, num_classes=2).eval()
    x = torch.randn(1, 3, 32, 32)
    y_s, y_t = lwf(x, return_both=True)
    torch.testing.assert_close(y_s, model(x))
    assert y_t.shape == (1, 2) and lwf.head_source is not model.classifier[3]
    assert isinstance(lwf.head_source, nn.Linear) and lwf.head_target.in_features == 1024


def test_from_pretrained_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    lwf = LwFClassifier.from_pretrained(model, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    y_s, y_t = lwf(x, return_both=True)
    torch.testing.assert_close(y_s, model(x))
    assert y_t.shape == (2, 3) and lwf.head_source.out_features == 7


def test_new_head_like_composite():
    head = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 100))
    new = new_head_like(head, 4)
    assert new[3].out_features == 4 and new[3].in_features == 6
    torch.testing.assert_close(new[0].weight, head[0].weight)  # hidden layers keep their pretrained weights
    assert new[0].weight is not head[0].weight
    with pytest.raises(ValueError, match="no nn.Linear"):
        new_head_like(nn.ReLU(), 3)


def test_param_groups_default_to_tllibs_lwf_layout():
    lwf = split(tiny_pretrained())
    groups = lwf.param_groups(0.01)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("backbone", pytest.approx(0.001)),
        ("bottleneck", 0.01),
        ("head_target", 0.01),
    ]  # tllib's lwf.Classifier.get_parameters: the source head is not in the optimizer
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in lwf.backbone.parameters()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in lwf.head_target.parameters()}
    trained = lwf.param_groups(0.01, source_head="pretrained", pretrained_lr_mult=1.0)  # LwF's paper / Co-Tuning
    assert [(g["name"], g["lr"]) for g in trained][:2] == [("backbone", 0.01), ("head_source", 0.01)]
    torch.optim.SGD(groups, lr=0.01)  # valid optimizer groups
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0.0"):
        lwf.param_groups(0.0)
    with pytest.raises(ValueError, match="source_head must be one of 'pretrained', 'new', 'excluded', got 'frozen'"):
        lwf.param_groups(0.1, source_head="frozen")


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_record_sequential_and_indexed_shuffled_agree():
    src = tiny_pretrained()
    ds = _data()
    expected = src(ds.tensors[0]).detach()
    seq = record_source_predictions(src, DataLoader(ds, batch_size=3))
    torch.testing.assert_close(seq, expected)
    shuffled = DataLoader(IndexedDataset(ds), batch_size=4, shuffle=True)
    torch.testing.assert_close(record_source_predictions(src, shuffled), expected)
    # an LwFClassifier records through its source branch
    torch.testing.assert_close(record_source_predictions(split(src), DataLoader(ds, batch_size=5)), expected)
    with pytest.raises(ValueError, match="shuffles but its batches carry no sample indices"):
        record_source_predictions(src, DataLoader(ds, batch_size=4, shuffle=True))


def test_record_restores_mode_and_uses_eval():
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.9))
    model.train()
    ds = _data()
    a = record_source_predictions(model, DataLoader(ds, batch_size=4))
    b = record_source_predictions(model, DataLoader(ds, batch_size=4))
    torch.testing.assert_close(a, b)  # dropout off: deterministic
    assert model.training


def test_record_cache_hit_and_invalidation(tmp_path):
    model = Counting(tiny_pretrained())
    loader = DataLoader(_data(), batch_size=5)
    first = record_source_predictions(model, loader, cache_dir=tmp_path)
    assert model.calls == 2 and len(list(tmp_path.glob("lwf-source-*.pt"))) == 1
    again = record_source_predictions(model, loader, cache_dir=tmp_path)
    assert model.calls == 2  # loaded, the model did not run
    torch.testing.assert_close(again, first)
    with torch.no_grad():
        model.inner[0].bias.add_(1.0)  # a changed model recomputes
    record_source_predictions(model, loader, cache_dir=tmp_path)
    assert model.calls == 4
    record_source_predictions(model, DataLoader(_data(seed=1), batch_size=5), cache_dir=tmp_path)  # changed data
    assert model.calls == 6
    record_source_predictions(model, loader, cache_dir=tmp_path, data_key="flowers-train-v1")
    record_source_predictions(model, loader, cache_dir=tmp_path, data_key="flowers-train-v1")
    assert model.calls == 8
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic writes leave no temp files


def test_lwf_objective_starts_with_zero_distillation():
    """At the start of training the source head reproduces the recorded targets, so KD = 0 (LwF's premise)."""
    src = tiny_pretrained()
    ds = IndexedDataset(_data())
    targets = record_source_predictions(src, DataLoader(ds, batch_size=4))
    lwf = split(src).train()
    x, y, idx = next(iter(DataLoader(ds, batch_size=4, shuffle=True)))
    y_s, y_t = lwf(x)
    assert float(kd_loss(y_s.detach(), targets[idx], temperature=2.0)) == pytest.approx(0.0, abs=1e-7)
    loss = F.cross_entropy(y_t, y) + kd_loss(y_s, targets[idx], temperature=2.0)
    loss.backward()
    assert lwf.head_target.weight.grad is not None


def test_bad_input():
    src = tiny_pretrained()
    with pytest.raises(ValueError, match="give num_classes"):
        LwFClassifier(src[:2], src[2])
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        LwFClassifier(src[:2], src[2], num_classes=0)
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        LwFClassifier(lambda x: x, src[2], num_classes=3)
    with pytest.raises(ValueError, match="has no nn.Linear classifier head"):
        LwFClassifier.from_pretrained(nn.Sequential(nn.Conv2d(2, 2, 1)), 3)
    with pytest.raises(KeyError, match="did you mean"):
        LwFClassifier.from_pretrained(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 3, head_name="11")
    with pytest.raises(ValueError, match="indices must cover"):
        bad = [(torch.randn(2, 6), torch.zeros(2), torch.tensor([0, 0]))]
        record_source_predictions(src, bad)
