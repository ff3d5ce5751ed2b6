"""Models of the engine: the built-in network, torchvision / timm architectures, weights, head swap."""

import pytest
import torch
from torch import nn

from finereg._checks import FineregError
from finereg.train.builtin import PRETRAIN, BuiltinNet, pretrained_path, pretrained_state
from finereg.train.cli import main
from finereg.train.models import Outputs, build_model, default_feature_layers, split_classifier

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--no-tensorboard", "--sample-rate", "30"]


def test_builtin_pretrained_source_model(builtin_cache):
    bundle = build_model("builtin", 5, in_channels=1)
    net = bundle.net
    assert bundle.weights == "builtin" and bundle.source_classes == 20  # digits 0-4 x 4 rotations
    assert net.head.out_features == 5 and net.source_head.out_features == 20
    assert not any(p.requires_grad for p in net.source_head.parameters())
    state = pretrained_state()
    assert torch.equal(net.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.source_head.weight, state["fc.weight"])
    x = torch.randn(3, 1, 8, 8)
    net.train()
    assert net(x).source_logits is None  # until a method asks for the source head
    net.use_source_head("co-tuning", "pretrained")
    out = net(x)
    assert isinstance(out, Outputs) and out.features.shape == (3, 128) and out.source_logits.shape == (3, 20)
    assert all(p.requires_grad for p in net.source_head.parameters())
    net.eval()
    assert net(x).shape == (3, 5)
    assert pretrained_path().parent == builtin_cache


def test_source_pretraining_is_deterministic_and_rebuilt_when_corrupt(builtin_cache):
    path = pretrained_path()
    good = torch.load(path, weights_only=True)
    assert good["info"]["holdout_accuracy"] > 90 and good["info"]["recipe"] == PRETRAIN
    path.write_bytes(b"garbage")
    logs = []
    state = pretrained_state(log=logs.append)
    assert any(f"cached source model {path} is unusable" in m for m in logs)
    assert any("pretrained the built-in" in m for m in logs)
    assert all(torch.equal(state[k], good["state_dict"][k]) for k in state)  # rebuilt bit for bit


@pytest.mark.parametrize(
    "foreign",
    [
        lambda good: {"state_dict": BuiltinNet(20, 1, width=16).state_dict(), "info": good["info"]},  # other shapes
        lambda good: {"state_dict": {"w": torch.ones(1)}, "info": good["info"]},  # another model's keys
        lambda good: {**good, "info": {**good["info"], "recipe": {**good["info"]["recipe"], "epochs": 1}}},  # stale
    ],
)
def test_a_stale_or_foreign_cache_file_is_named_and_rebuilt(builtin_cache, foreign):
    """Before: a foreign cache file gave 'finereg fit: error: fc.weight' and was never rebuilt."""
    path = pretrained_path()
    good = torch.load(path, weights_only=True)
    torch.save(foreign(good), path)
    logs = []
    state = pretrained_state(log=logs.append)
    assert any(f"cached source model {path} is unusable" in m for m in logs), logs
    assert all(torch.equal(state[k], good["state_dict"][k]) for k in good["state_dict"])


def test_torchvision_and_timm_heads_are_swapped():
    tv = build_model("resnet18", 7, weights="none")
    assert tv.net.head.out_features == 7 and tv.net.source_head is None and tv.feature_dim == 512
    assert isinstance(tv.net.backbone.fc, nn.Identity)
    tm = build_model("resnet10t", 4, weights="none")
    assert tm.net.head.out_features == 4 and isinstance(tm.net.backbone.fc, nn.Identity)
    tm.net.eval()
    assert tm.net(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_weights_from_a_file_keep_the_old_head_as_source(tmp_path):
    src = BuiltinNet(num_classes=9)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    bundle = build_model("builtin", 3, weights=str(tmp_path / "w.pt"), in_channels=1)
    assert bundle.source_classes == 9
    assert torch.equal(bundle.net.source_head.weight, src.fc.weight)
    assert torch.equal(bundle.net.backbone.conv3.weight, src.conv3.weight)
    torch.save({"net": bundle.net.state_dict()}, tmp_path / "finetuned.pt")  # a finereg run's network
    again = build_model("builtin", 2, weights=str(tmp_path / "finetuned.pt"), in_channels=1)
    assert again.source_classes == 3 and torch.equal(again.net.source_head.weight, bundle.net.head.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit 'builtin'"):
        build_model("builtin", 3, weights=str(tmp_path / "bad.pt"), in_channels=1)


@pytest.mark.parametrize(
    "arch,weights,match",
    [
        ("resnet51", None, "no architecture named 'resnet51'; did you mean one of: .*'resnet50'"),
        ("resnet18", "builtin", "does not fit arch 'resnet18'"),
        ("builtin", "/no/such/file.pt", "does not exist"),
        ("resnet18", "pretrained", "could not fetch pretrained weights .*--weights PATH"),
        ("resnet10t", "pretrained", "could not fetch pretrained weights"),
    ],
)
def test_bad_model_choices(arch, weights, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")
    with pytest.raises((KeyError, ValueError, FileNotFoundError, RuntimeError), match=match):
        build_model(arch, 3, weights=weights, in_channels=1 if arch == "builtin" else 3)


def test_split_classifier_finds_the_last_linear():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Dropout(), nn.Linear(8, 3)))
    backbone, head, name = split_classifier(model)
    assert name == "2.1" and head.out_features == 3 and isinstance(backbone[2][1], nn.Identity)
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        split_classifier(nn.Conv2d(1, 1, 1))


def test_default_feature_layers_match_tllib_on_resnet50():
    net = build_model("resnet50", 3, weights="none").net
    assert default_feature_layers(net) == [
        "backbone.layer1.2.conv3",
        "backbone.layer2.3.conv3",
        "backbone.layer3.5.conv3",
        "backbone.layer4.2.conv3",
    ]
    small = build_model("builtin", 5, in_channels=1).net
    assert default_feature_layers(small) == ["backbone.conv2", "backbone.conv3"]
    vgg = build_model("vgg11", 3, weights="none").net  # one conv-holding child: its plain convs but the stem
    assert default_feature_layers(vgg) == [
        "backbone.features.11",
        "backbone.features.13",
        "backbone.features.16",
        "backbone.features.18",
    ]


def test_hub_weights_for_the_builtin_network_are_an_error(tmp_path, capsys):
    for weights in ("pretrained", "IMAGENET1K_V1"):
        assert main(["fit", "--weights", weights, "--out", str(tmp_path / weights), *TINY]) == 2
        err = capsys.readouterr().err
        assert "--weights builtin" in err and "Traceback" not in err


def test_weights_that_are_no_weights_file_say_so(tmp_path, capsys):
    """Before: a text file printed torch's advice to load with weights_only=False; a directory 'did not exist'."""
    (tmp_path / "notes.pt").write_text("my notes")
    assert main(["fit", "--weights", str(tmp_path / "notes.pt"), "--out", str(tmp_path / "a"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "it is not a file written by torch.save" in err and "weights_only" not in err
    assert main(["fit", "--weights", str(tmp_path), "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "is a directory; give a weights file" in capsys.readouterr().err
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a whole module, not a state_dict
    with pytest.raises(FineregError, match="holds Python objects besides tensors, which finereg does not unpickle"):
        build_model("builtin", 3, weights=str(tmp_path / "pickled.pt"), in_channels=1)
