"""``tllib.regularization.knowledge_distillation``."""

from .._tllib_head import KnowledgeDistillationLoss

__all__ = ["KnowledgeDistillationLoss"]
