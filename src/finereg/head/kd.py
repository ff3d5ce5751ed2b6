"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

    KD_T(s, t) = KL( softmax(t / T) ‖ softmax(s / T) )          T: the temperature
               = Σ_c softmax(t/T)_c · ( log softmax(t/T)_c − log softmax(s/T)_c )

reduced over the batch (``'batchmean'``: the sum divided by the batch size, the true KL per sample). This is
tllib's ``KnowledgeDistillationLoss`` value exactly: it has **no T² factor**. Hinton et al. multiply by T² so
that the gradient's magnitude does not shrink as 1/T² when the temperature grows (keeping the balance with a
hard-label loss the same across temperatures); ``t2_scaling=True`` gives that form, T² · KD_T.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_bool, check_choice, check_number
from .._deprecate import renamed, renamed_attribute

__all__ = ["kd_loss", "KnowledgeDistillation"]

_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _check_options(temperature: float, reduction: str) -> float:
    check_choice(reduction, "reduction", _REDUCTIONS)
    return check_number(temperature, "temperature", low=0, low_open=True)


@renamed(T="temperature", since="0.2")
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    t2_scaling: bool = False,
) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dimension (see module docstring).

    Args:
        student_logits: (b, C) or (b, ..., C) logits of the model being trained.
        teacher_logits: logits of the teacher, same shape. Not detached (as in tllib): pass
            recorded or ``no_grad`` teacher outputs.
        temperature: T (> 0). Default 1.
        reduction: ``'batchmean'`` (default, tllib), ``'sum'``, ``'mean'`` (over all elements) or ``'none'``.
        t2_scaling: multiply by T² (Hinton et al.); default False (tllib's value).
    """
    T = _check_options(temperature, reduction)
    if not (isinstance(student_logits, Tensor) and isinstance(teacher_logits, Tensor)):
        raise FineregTypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise FineregError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise FineregError(f"logits need a class dimension (the last one); got shape {tuple(student_logits.shape)}")
    if student_logits.numel() == 0 and reduction in ("batchmean", "mean"):
        raise FineregError(
            f"kd_loss got an empty batch (logits of shape {tuple(student_logits.shape)}): its {reduction} is "
            "undefined; skip empty batches (e.g. DataLoader(..., drop_last=True))"
        )
    loss = F.kl_div(
        F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1), reduction=reduction
    )
    return loss * (T * T) if t2_scaling else loss


class KnowledgeDistillation(nn.Module):
    """Knowledge distillation loss as a module: ``KnowledgeDistillation(temperature)(student, teacher)``.

    Value: KD_T = KL(softmax(t/T) ‖ softmax(s/T)), batch mean; × T² when ``t2_scaling`` (Hinton et al.).

    Args:
        temperature: T, default 1 (LwF's paper uses T = 2).
        reduction: ``'batchmean'`` (default), ``'sum'``, ``'mean'`` or ``'none'``.
        t2_scaling: multiply by T², default False (tllib's value).
    """

    T = renamed_attribute("T", "temperature", since="0.2")

    @renamed(T="temperature", since="0.2")
    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", t2_scaling: bool = False):
        super().__init__()
        self.temperature = _check_options(temperature, reduction)
        self.reduction = reduction
        self.t2_scaling = check_bool(t2_scaling, "t2_scaling")

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, self.reduction, self.t2_scaling)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, t2_scaling={self.t2_scaling}"
