"""Weight-standardize a torchvision ResNet-50 (BiT-style GroupNorm + WS), train a step, bake, export.

    python examples/standardize_resnet.py              # random weights, CPU, ~1 minute
    python examples/standardize_resnet.py --variant bit --size 96

For real weights build the model with ``resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)`` (downloaded by
torchvision) before converting. Note WS changes what every convolution computes: it suits models trained
with WS (BiT, NF-Nets) or training from scratch / long fine-tuning; on an ImageNet BatchNorm ResNet the
converted model starts from a different function than the checkpoint.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from finereg.reparam.norm import batchnorm_to_groupnorm
from finereg.reparam.standardize import bake, standardize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="ws", choices=["ws", "bit", "scaled"])
    ap.add_argument("--size", type=int, default=64, help="input height/width (default 64)")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)

    model = resnet50(weights=None, num_classes=10)  # weights=ResNet50_Weights.IMAGENET1K_V2 for real weights
    print(batchnorm_to_groupnorm(model, num_groups=32).changed[:2], "...")  # WS's partner: GroupNorm
    report = standardize(model, args.variant)  # every convolution; add linear=True for the fc head too
    print(str(report).splitlines()[0])
    print("\n".join(str(report).splitlines()[1:4]), "\n  ...")

    # one training step: the raw weights are the trained parameters, autograd goes through WS
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    print(f"train step: loss {loss.item():.4f}")

    # inference: eval() caches each standardized weight; bake() leaves plain convolutions holding them
    model.eval()
    with torch.no_grad():
        ref = model(x)
    baked = copy.deepcopy(model)
    print(str(bake(baked)).splitlines()[0])
    with torch.no_grad():
        out = baked(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    print(f"baked == standardized: max |diff| {float((out - ref).abs().max()):.2e}")

    exported = torch.export.export(baked, (x,))
    with torch.no_grad():
        out = exported.module()(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    print(f"torch.export of the baked model == standardized: max |diff| {float((out - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
