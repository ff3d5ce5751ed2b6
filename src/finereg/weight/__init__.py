"""Weight penalties: L2, L2-SP and penalties over groups of weight tensors from several layers."""

from .groups import GroupMember, WeightGroup, matrix_to_weight, matrix_view, weight_matrix
from .l2 import L2, L2SP, canonical_name
from .orthogonal import (
    SRIP,
    CallablePenalty,
    DoubleSoftOrthogonality,
    GroupPenalty,
    MutualCoherence,
    Orthogonality,
    SoftOrthogonality,
    create_penalty,
    keras_orthogonality,
)

__all__ = [
    "L2",
    "L2SP",
    "canonical_name",
    "WeightGroup",
    "GroupMember",
    "matrix_view",
    "matrix_to_weight",
    "weight_matrix",
    "GroupPenalty",
    "Orthogonality",
    "SoftOrthogonality",
    "DoubleSoftOrthogonality",
    "MutualCoherence",
    "SRIP",
    "CallablePenalty",
    "create_penalty",
    "keras_orthogonality",
]
