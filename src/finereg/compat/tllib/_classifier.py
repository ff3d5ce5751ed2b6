"""``tllib.modules.classifier``: the generic classifier tllib's regularization modules build on, and the shared
conventions of its classifiers (default pool, ``features_dim``, ``get_parameters``)."""

from __future__ import annotations

from torch import Tensor, nn

from ..._checks import FineregError, FineregTypeError
from ...lr_policy import param_groups

__all__ = ["Classifier"]


def default_pool() -> nn.Module:
    """tllib's default ``pool_layer``: global average pooling then flatten."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(1, 1)), nn.Flatten())


def features_dim(backbone: nn.Module, bottleneck: nn.Module | None, bottleneck_dim: int | None) -> int:
    """The size of the features the heads read: ``bottleneck_dim`` with a bottleneck, else ``backbone.out_features``."""
    if bottleneck is not None:
        if not (isinstance(bottleneck_dim, int) and bottleneck_dim > 0):
            raise FineregError(f"bottleneck_dim must be > 0 (the bottleneck's output size), got {bottleneck_dim!r}")
        return bottleneck_dim
    dim = getattr(backbone, "out_features", None)
    if not isinstance(dim, int):
        raise FineregTypeError(
            "backbone.out_features must be an int (tllib's convention: the size of the backbone's features), got "
            f"{type(dim).__name__}"
        )
    return dim


def get_parameters(model: nn.Module, base_lr: float, parts: dict) -> list[dict]:
    """tllib's ``get_parameters(base_lr)``: :func:`finereg.lr_policy.param_groups` of ``parts`` with the pretrained
    parts at 0.1·base_lr when ``model.finetune`` (else 1.0·base_lr), as tllib's ``{"params", "lr"}`` dicts."""
    groups = param_groups(model, base_lr, parts, pretrained_lr_mult=0.1 if model.finetune else 1.0)
    return [{"params": g["params"], "lr": g["lr"]} for g in groups]


class Classifier(nn.Module):
    """tllib's ``Classifier(backbone, num_classes, bottleneck=None, bottleneck_dim=-1, head=None, finetune=True,
    pool_layer=None)`` (``tllib.modules.classifier``): f = bottleneck(pool_layer(backbone(x))), predictions =
    head(f); training mode (or ``return_feat=True``) returns ``(predictions, f)``, eval mode ``predictions``.
    ``get_parameters(base_lr)``: backbone 0.1·base_lr (1.0·base_lr if not ``finetune``), bottleneck and head
    base_lr (:mod:`finereg.lr_policy`)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        bottleneck: nn.Module | None = None,
        bottleneck_dim: int | None = -1,
        head: nn.Module | None = None,
        finetune: bool = True,
        pool_layer: nn.Module | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.pool_layer = default_pool() if pool_layer is None else pool_layer
        self._features_dim = features_dim(backbone, bottleneck, bottleneck_dim)
        self.bottleneck = nn.Identity() if bottleneck is None else bottleneck
        self.head = nn.Linear(self._features_dim, num_classes) if head is None else head
        self.finetune = finetune

    @property
    def features_dim(self) -> int:
        """The size of the features before the head."""
        return self._features_dim

    def forward(self, x: Tensor, return_feat: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        f = self.bottleneck(self.pool_layer(self.backbone(x)))
        predictions = self.head(f)
        if self.training or return_feat:
            return predictions, f
        return predictions

    def get_parameters(self, base_lr: float = 1.0) -> list[dict]:
        parts = {"backbone": "pretrained", "bottleneck": "new", "head": "new", "pool_layer": "excluded"}
        return get_parameters(self, base_lr, parts)
