"""The EfficientNet-PyTorch → timm key map: every key by name, every shape, clear errors on a bad state."""

import random
from collections import OrderedDict

import pytest
import torch

from finereg._checks import FineregError
from finereg.models import PACKAGED, convert_efficientnet_state, create_model, efficientnet_key_map, weights_path


def packaged_state(arch):
    return torch.load(weights_path(arch), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_target():
    import timm

    return timm.create_model("efficientnet_lite0", pad_type="same", bn_eps=1e-3).state_dict()


def test_named_examples():
    """A few keys spelled out: the first block is depthwise-separable, the others inverted residuals."""
    keys = packaged_state("efficientnet_lite0").keys()
    m = efficientnet_key_map(keys, PACKAGED["efficientnet_lite0"].stage_depths)
    assert m["_conv_stem.weight"] == "conv_stem.weight"
    assert m["_bn0.running_var"] == "bn1.running_var"
    assert m["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert m["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"  # ds block: project = conv_pw
    assert m["_blocks.0._bn2.bias"] == "blocks.0.0.bn2.bias"
    assert m["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"  # ir block: expand = conv_pw
    assert m["_blocks.1._bn0.weight"] == "blocks.1.0.bn1.weight"
    assert m["_blocks.2._depthwise_conv.weight"] == "blocks.1.1.conv_dw.weight"
    assert m["_blocks.3._bn2.num_batches_tracked"] == "blocks.2.0.bn3.num_batches_tracked"
    assert m["_blocks.14._project_conv.weight"] == "blocks.5.3.conv_pwl.weight"
    assert m["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert m["_conv_head.weight"] == "conv_head.weight" and m["_bn1.bias"] == "bn2.bias"
    assert m["_fc.weight"] == "classifier.weight"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_every_key_and_shape(n):
    """All 296 (Lite0) source keys map one-to-one onto all of timm's keys with equal shapes, for both names."""
    import timm

    state = packaged_state(f"efficientnet_lite{n}")
    w = PACKAGED[f"efficientnet_lite{n}"]
    m = efficientnet_key_map(state.keys(), w.stage_depths)
    for name in (f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}"):
        target = timm.create_model(name).state_dict()
        assert len(m) == len(state) and set(m.values()) == set(target) and len(set(m.values())) == len(m)
        assert all(state[k].shape == target[v].shape for k, v in m.items())
    if n == 0:
        assert len(state) == 296


def test_by_name_not_position(lite0_target):
    """Shuffling the order of the source keys changes nothing."""
    state = packaged_state("efficientnet_lite0")
    keys = list(state)
    random.Random(0).shuffle(keys)
    shuffled = OrderedDict((k, state[k]) for k in keys)
    depths = PACKAGED["efficientnet_lite0"].stage_depths
    a = convert_efficientnet_state(state, lite0_target, depths)
    b = convert_efficientnet_state(shuffled, lite0_target, depths)
    assert set(a) == set(b) and all(a[k] is b[k] for k in a)


def test_matches_reference_implementation():
    """The converted model computes what the package's own model (EfficientNet-Lite-PyTorch) computes."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_path("efficientnet_lite0"))
    )
    ref.eval()
    ours = create_model("efficientnet_lite0", pretrained=True).eval()
    torch.manual_seed(0)
    for size in (224, 64, 32):  # the reference pads for 224 px statically: sizes it handles like TF's SAME
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_wrong_shape_is_named(lite0_target):
    state = dict(packaged_state("efficientnet_lite0"))
    state["_blocks.4._depthwise_conv.weight"] = torch.zeros(240, 1, 3, 3)  # the 5x5 kernel made 3x3
    with pytest.raises(FineregError, match=r"blocks\.2\.1\.conv_dw\.weight \(240, 1, 3, 3\) vs model \(240, 1, 5, 5\)"):
        convert_efficientnet_state(state, lite0_target, PACKAGED["efficientnet_lite0"].stage_depths)


def test_missing_key_is_named(lite0_target):
    state = dict(packaged_state("efficientnet_lite0"))
    del state["_blocks.7._bn1.running_mean"]
    with pytest.raises(FineregError, match=r"blocks\.3\.2\.bn2\.running_mean get no weights"):
        convert_efficientnet_state(state, lite0_target, PACKAGED["efficientnet_lite0"].stage_depths)


def test_unknown_key_is_named(lite0_target):
    state = dict(packaged_state("efficientnet_lite0"))
    state["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)  # squeeze-excitation: not in Lite
    with pytest.raises(FineregError, match=r"not in the EfficientNet-Lite layout.*_blocks\.3\._se_reduce\.weight"):
        convert_efficientnet_state(state, lite0_target, PACKAGED["efficientnet_lite0"].stage_depths)


def test_other_variant_is_refused(lite0_target):
    """Lite1 weights (more blocks) into a Lite0 model: refused with a reason, not loaded by position."""
    with pytest.raises(FineregError, match="another EfficientNet variant"):
        convert_efficientnet_state(
            packaged_state("efficientnet_lite1"), lite0_target, PACKAGED["efficientnet_lite0"].stage_depths
        )
    with pytest.raises(FineregError, match="do not fit the model"):
        convert_efficientnet_state(
            packaged_state("efficientnet_lite1"), lite0_target, PACKAGED["efficientnet_lite1"].stage_depths
        )


def test_pytorch_padding_is_another_function():
    """Why the TF settings are the default: timm's efficientnet_lite0 with its PyTorch padding and BatchNorm ε 1e-5
    computes something else with these weights (docs/models.md)."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_path("efficientnet_lite0"))
    )
    plain = create_model("efficientnet_lite0", pretrained=True, pad_type="", bn_eps=1e-5).eval()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        diff = (plain(x) - ref.eval()(x)).abs().max()
    assert diff > 1.0, float(diff)
