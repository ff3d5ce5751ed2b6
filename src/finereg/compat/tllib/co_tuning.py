"""``tllib.regularization.co_tuning``: the classifier, ``CoTuningLoss`` and ``Relationship``.

tllib's ``__all__``: ``Classifier``, ``CoTuningLoss``, ``Relationship``. The relationship is computed in one
vectorized pass and its cache written atomically at exactly the given path; the differences from tllib are listed
in docs/head_methods.md.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._checks import FineregWarning
from ..._utils import atomic_write
from ...head.co_tuning import CoTuningLoss as _CoTuningLoss
from ...head.co_tuning import class_mean_rows, collect_source_outputs
from .lwf import Classifier as ClassifierBase

__all__ = ["Classifier", "CoTuningLoss", "Relationship"]


class CoTuningLoss(_CoTuningLoss):
    """tllib's ``CoTuningLoss()(input, target)`` = mean over the batch of −Σ target · log_softmax(input)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 -- tllib's argument names
        return super().forward(input, target)


class Relationship:
    """tllib's ``Relationship(data_loader, classifier, device, cache=None)``: the direct category relationship
    p(y_s | y_t) as a numpy array ``relationship`` (N_t, N_p), N_t = the largest label + 1; ``rel[category]``
    gives rows (``category`` may be a tensor of labels, as tllib's script passes).

    If ``cache`` names an existing file it is loaded (``np.load``); otherwise the relationship is computed from
    ``softmax(classifier(x))`` over the loader (eval mode, ``no_grad``) and, if ``cache`` is given, saved there.
    A class without samples (tllib's script with ``-sc``, a random subset of the training set) gets a NaN row and a
    :class:`~finereg._checks.FineregWarning`, as in tllib (where numpy warns "Mean of empty slice"): training never
    reads it, its class has no sample. finereg's own :func:`~finereg.head.co_tuning.direct_relationship` refuses it.
    """

    def __init__(self, data_loader, classifier: torch.nn.Module, device, cache: str | None = None):
        import numpy as np

        self.data_loader = data_loader
        self.classifier = classifier
        self.device = device
        if cache is None or not os.path.exists(cache):
            source_predictions, target_labels = self.collect_labels()
            self.relationship = self.get_category_relationship(source_predictions, target_labels)
            if cache is not None:
                atomic_write(cache, lambda f: np.save(f, self.relationship))
        else:
            self.relationship = np.load(cache)

    def __getitem__(self, category):
        return self.relationship[category]

    def collect_labels(self):
        """(source probabilities (N, N_p), target labels (N,)) as numpy arrays."""
        logits, labels = collect_source_outputs(self.classifier, self.data_loader, self.device)
        return F.softmax(logits, dim=1).numpy(), labels.numpy()

    def get_category_relationship(self, source_probabilities, target_labels):
        """Row i = mean of the source probabilities over the samples of target class i (N_t = max label + 1)."""
        probs, labels = torch.as_tensor(source_probabilities), torch.as_tensor(target_labels).long()
        rows, counts = class_mean_rows(probs, labels, int(labels.max()) + 1)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            warnings.warn(
                f"target class(es) {empty[:10]}{' ...' if len(empty) > 10 else ''} have no sample: their rows of the "
                "relationship are NaN (as in tllib); training never reads them",
                FineregWarning,
                stacklevel=2,
            )
        return rows.numpy()


class Classifier(ClassifierBase):
    """tllib's ``co_tuning.Classifier``: the LwF classifier whose ``get_parameters`` also trains the source head
    (at the backbone's rate: 0.1·base_lr when fine-tuning)."""

    _source_head_role = "pretrained"
