"""finereg inside the trainers people already use: Hugging Face ``Trainer`` and PyTorch Lightning.

The terms (:mod:`~finereg.integrations.terms`) and :class:`Regularization` need torch only; the trainer
adapters are imported on demand and need their extra:

* :mod:`finereg.integrations.transformers` (``pip install 'finereg[hf]'``): ``FineregTrainer``,
  ``FineregTrainerMixin``;
* :mod:`finereg.integrations.lightning` (``pip install 'finereg[lightning]'``): ``FineregCallback``,
  ``FineregModule``.

A real text task and model for both, offline: :mod:`finereg.integrations.text_task` (Python standard library
docstrings labelled by module) and :mod:`finereg.integrations.minilm` (the pretrained all-MiniLM-L6-v2 with a
classification head). The guide: ``docs/integrations.md``.
"""

from .regularization import Regularization, call_model
from .terms import BSSTerm, DeltaTerm, KDTerm, L2SPTerm, Term, WrapOptimizer

__all__ = ["Regularization", "call_model", "Term", "L2SPTerm", "DeltaTerm", "BSSTerm", "KDTerm", "WrapOptimizer"]
