"""Feature penalties: persistent feature capture, DELTA (behavioral, attention-weighted; channel attention and its
classifier), BSS."""

from .attention import attention_from_importance, channel_attention, channel_importance
from .attention_classifier import train_attention_classifier
from .bss import BSS, BSS_METHODS, batch_spectral_shrinkage
from .capture import FeatureCapture, Selector
from .delta import AttentionBehavioralPenalty, BehavioralPenalty, attention_behavioral_penalty, behavioral_penalty

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
