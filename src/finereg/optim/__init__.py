"""Optimizer wrappers for robust fine-tuning: SPD, FTP and decoupled L2-SP around any torch optimizer.

Each wraps a ``torch.optim.Optimizer`` (SGD, Adam, AdamW, their foreach / fused forms), is one itself (LR
schedulers, ``zero_grad``, ``param_groups``), and keeps every piece of its state in ``state_dict()``.
"""

from .decoupled import DecoupledL2SP
from .ftp import FTP
from .spd import SPD

__all__ = ["SPD", "FTP", "DecoupledL2SP"]
