"""``tllib.regularization.knowledge_distillation``: ``KnowledgeDistillationLoss``.

A star import gives what tllib's gives: ``KnowledgeDistillationLoss``, ``nn`` and ``F``.
"""

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...head.kd import KnowledgeDistillation

__all__ = ["F", "nn", "KnowledgeDistillationLoss"]


class KnowledgeDistillationLoss(KnowledgeDistillation):
    """tllib's ``KnowledgeDistillationLoss(T=1., reduction='batchmean')``:
    KLDiv(reduction)(log_softmax(y_student / T), softmax(y_teacher / T)), no T² factor."""

    def __init__(self, T: float = 1.0, reduction: str = "batchmean"):  # noqa: N803 -- tllib's argument name
        super().__init__(temperature=T, reduction=reduction)

    @property
    def T(self) -> float:  # noqa: N802 -- tllib's attribute
        return self.temperature

    def forward(self, y_student: Tensor, y_teacher: Tensor) -> Tensor:  # tllib's argument names
        return super().forward(y_student, y_teacher)
