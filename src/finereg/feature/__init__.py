"""Feature penalties: persistent feature capture, DELTA (behavioral, attention-weighted, channel attention), BSS."""

from .bss import BSS, BSS_METHODS, batch_spectral_shrinkage
from .capture import FeatureCapture, Selector
from .delta import (
    AttentionBehavioralPenalty,
    BehavioralPenalty,
    attention_behavioral_penalty,
    attention_from_importance,
    behavioral_penalty,
    channel_attention,
    channel_importance,
    train_attention_classifier,
)

__all__ = [
    "FeatureCapture",
    "Selector",
    "BSS",
    "BSS_METHODS",
    "batch_spectral_shrinkage",
    "behavioral_penalty",
    "attention_behavioral_penalty",
    "BehavioralPenalty",
    "AttentionBehavioralPenalty",
    "channel_importance",
    "attention_from_importance",
    "channel_attention",
    "train_attention_classifier",
]
