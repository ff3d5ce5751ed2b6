"""``finereg.compat.tllib`` mirrors ``tllib.regularization``'s modules and tllib's forward argument names, so that
a tllib user changes only the package in an import line and keyword calls keep working."""

import importlib
import inspect

import pytest
import torch

# tllib module -> the names its users import from it
TLLIB_MODULES = {
    "delta": [
        "L2Regularization",
        "SPRegularization",
        "BehavioralRegularization",
        "AttentionBehavioralRegularization",
        "IntermediateLayerGetter",
    ],
    "bss": ["BatchSpectralShrinkage"],
    "knowledge_distillation": ["KnowledgeDistillationLoss"],
    "lwf": ["Classifier", "collect_pretrain_labels"],
    "co_tuning": ["Classifier", "CoTuningLoss", "Relationship"],
    "bi_tuning": ["Classifier", "BiTuning"],
}


@pytest.mark.parametrize("module", sorted(TLLIB_MODULES))
def test_import_paths_of_tllib(module):
    mod = importlib.import_module(f"finereg.compat.tllib.{module}")
    top = importlib.import_module("finereg.compat.tllib")
    assert sorted(mod.__all__) == sorted(TLLIB_MODULES[module])
    for name in TLLIB_MODULES[module]:
        obj = getattr(mod, name)
        flat = {"lwf": "LwFClassifier", "co_tuning": "CoTuningClassifier", "bi_tuning": "BiTuningClassifier"}
        assert getattr(top, flat[module] if name == "Classifier" else name) is obj  # one class, two paths
    assert getattr(top, module) is mod


def test_forward_argument_names_are_tllibs():
    from finereg.compat.tllib import BatchSpectralShrinkage, CoTuningLoss, KnowledgeDistillationLoss

    names = lambda cls: list(inspect.signature(cls.forward).parameters)[1:]
    assert names(KnowledgeDistillationLoss) == ["y_student", "y_teacher"]
    assert names(BatchSpectralShrinkage) == ["feature"]
    assert names(CoTuningLoss) == ["input", "target"]
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    kd = KnowledgeDistillationLoss(T=2.0)
    assert torch.equal(kd(y_student=s, y_teacher=t), kd(s, t))
    f = torch.randn(8, 5, generator=gen)
    assert torch.equal(BatchSpectralShrinkage(k=2)(feature=f), BatchSpectralShrinkage(k=2)(f))
    q = torch.softmax(t, 1)
    assert torch.equal(CoTuningLoss()(input=s, target=q), CoTuningLoss()(s, q))
