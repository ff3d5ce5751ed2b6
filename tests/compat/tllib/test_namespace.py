"""finereg.compat.tllib is a drop-in for tllib.regularization: a star import of each module gives every public
name tllib's star import gives (tllib's lists below, read from its sources: modules without ``__all__`` hand over
their imports too, and tllib's delta.py script uses ``torch``, ``nn`` and ``get_attribute`` from it); the package
holds tllib's package-level names; forward arguments keep tllib's names."""

import collections
import functools
import importlib
import inspect
import typing

import pytest
import torch

import finereg.compat.tllib as compat

# What `from tllib.regularization.<module> import *` gives (tllib 0.4, tllib/regularization/*.py).
TLLIB_STAR = {
    "delta": {  # no __all__
        "torch",
        "nn",
        "functools",
        "OrderedDict",
        "L2Regularization",
        "SPRegularization",
        "BehavioralRegularization",
        "AttentionBehavioralRegularization",
        "get_attribute",
        "IntermediateLayerGetter",
    },
    "bss": {"BatchSpectralShrinkage"},  # __all__
    "knowledge_distillation": {"nn", "F", "KnowledgeDistillationLoss"},  # no __all__
    "lwf": {"Optional", "List", "Dict", "torch", "nn", "tqdm", "collect_pretrain_labels", "Classifier"},  # no __all__
    "co_tuning": {"Classifier", "CoTuningLoss", "Relationship"},  # __all__
    "bi_tuning": {"torch", "nn", "normalize", "ClassifierBase", "Classifier", "BiTuning"},  # no __all__
}
# finereg's additions, documented in each module's docstring
EXTRAS = {"delta": {"calculate_channel_attention"}}
# What tllib/regularization/__init__.py holds after `from .bss import *`, `.co_tuning`, `.delta`, `.bi_tuning`,
# `.knowledge_distillation` (in that order: Classifier ends up Bi-Tuning's), plus the submodules, lwf included
# (co_tuning imports it); its __all__ is the five star-imported submodules.
TLLIB_PACKAGE = set().union(
    *(TLLIB_STAR[m] for m in ("bss", "co_tuning", "delta", "bi_tuning", "knowledge_distillation"))
)
TLLIB_PACKAGE |= {"bss", "co_tuning", "delta", "bi_tuning", "knowledge_distillation", "lwf"}
TLLIB_PACKAGE_ALL = {"bss", "co_tuning", "delta", "bi_tuning", "knowledge_distillation"}


def _star(module: str) -> dict:
    ns: dict = {}
    exec(f"from {module} import *", ns)
    return {k: v for k, v in ns.items() if not k.startswith("_")}


@pytest.mark.parametrize("module", sorted(TLLIB_STAR))
def test_star_import_gives_tllibs_names(module):
    got = _star(f"finereg.compat.tllib.{module}")
    assert TLLIB_STAR[module] <= set(got), f"missing: {TLLIB_STAR[module] - set(got)}"
    assert set(got) - TLLIB_STAR[module] <= EXTRAS.get(module, set()), "undocumented extra names"
    expected = {
        "torch": torch,
        "nn": torch.nn,
        "F": torch.nn.functional,
        "normalize": torch.nn.functional.normalize,
        "functools": functools,
        "OrderedDict": collections.OrderedDict,
        "Optional": typing.Optional,
        "List": typing.List,  # noqa: UP006
        "Dict": typing.Dict,  # noqa: UP006
    }
    for name, obj in expected.items():
        if name in got:
            assert got[name] is obj, name
    if "tqdm" in got:
        assert got["tqdm"] is importlib.import_module("tqdm")
    mod = importlib.import_module(f"finereg.compat.tllib.{module}")
    assert getattr(compat, module) is mod


def test_the_package_holds_tllibs_package_level_names():
    missing = [n for n in TLLIB_PACKAGE if not hasattr(compat, n)]
    assert not missing
    assert compat.Classifier is compat.bi_tuning.Classifier  # tllib.regularization.Classifier is Bi-Tuning's
    assert compat.ClassifierBase is compat.bi_tuning.ClassifierBase
    for name in TLLIB_STAR["delta"] - {"torch", "nn", "functools", "OrderedDict"}:
        assert getattr(compat, name) is getattr(compat.delta, name)
    assert TLLIB_PACKAGE_ALL <= set(_star("finereg.compat.tllib"))
    assert compat.LwFClassifier is compat.lwf.Classifier and compat.CoTuningClassifier is compat.co_tuning.Classifier
    assert compat.BiTuningClassifier is compat.bi_tuning.Classifier


def test_classifier_base_is_tllibs_generic_classifier():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    backbone.out_features = 4
    model = compat.ClassifierBase(backbone, 5)
    x = torch.randn(2, 3, 6, 6)
    y, f = model(x)  # training mode: (predictions, features)
    assert y.shape == (2, 5) and f.shape == (2, 4) and model.features_dim == 4
    assert model.eval()(x).shape == (2, 5) and len(model(x, return_feat=True)) == 2
    assert [g["lr"] for g in model.get_parameters(1.0)] == [0.1, 1.0, 1.0]


def test_forward_argument_names_are_tllibs():
    names = lambda cls: list(inspect.signature(cls.forward).parameters)[1:]
    assert names(compat.KnowledgeDistillationLoss) == ["y_student", "y_teacher"]
    assert names(compat.BatchSpectralShrinkage) == ["feature"]
    assert names(compat.CoTuningLoss) == ["input", "target"]
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    kd = compat.KnowledgeDistillationLoss(T=2.0)
    assert torch.equal(kd(y_student=s, y_teacher=t), kd(s, t))
    f = torch.randn(8, 5, generator=gen)
    assert torch.equal(compat.BatchSpectralShrinkage(k=2)(feature=f), compat.BatchSpectralShrinkage(k=2)(f))
    q = torch.softmax(t, 1)
    assert torch.equal(compat.CoTuningLoss()(input=s, target=q), compat.CoTuningLoss()(s, q))
