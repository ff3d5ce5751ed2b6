"""The public names promised by the README import from the top-level package and its subpackages."""

import importlib

import pytest

import finereg

SUBPACKAGES = [
    "finereg",
    "finereg.weight",
    "finereg.feature",
    "finereg.head",
    "finereg.reparam",
    "finereg.train",
    "finereg.compat.tllib",
    "finereg.compat.keras",
    # robust fine-tuning (issue 11)
    "finereg.optim",
    "finereg.merge",
    "finereg.models",
    # trainer integrations (issue 12); the trainers themselves are imported on demand
    "finereg.integrations",
    # CIFAR-10-C corruptions (numpy only at import; the image libraries are imported on demand)
    "finereg.corruptions",
]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_all_names_resolve(name):
    mod = importlib.import_module(name)
    assert mod.__all__, f"{name} exports nothing"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


def test_top_level_has_every_family():
    for n in [
        "L2",
        "L2SP",
        "WeightGroup",
        "SoftOrthogonality",
        "FeatureCapture",
        "behavioral_penalty",
        "channel_attention",
        "BSS",
        "kd_loss",
        "LwFClassifier",
        "CoTuningLoss",
        "BiTuning",
        "freeze",
        "unfreeze",
        "standardize",
        "bake",
        "batchnorm_to_groupnorm",
    ]:
        assert n in finereg.__all__ and callable(getattr(finereg, n)), n
    assert len(set(finereg.__all__)) == len(finereg.__all__), "a name is exported by two families"


def test_top_level_holds_user_facing_names_only():
    """Helpers stay importable from their modules, not from ``finereg`` (README, Conventions)."""
    from finereg.head.lwf import IndexedDataset  # noqa: F401
    from finereg.reparam.standardize import VARIANTS  # noqa: F401
    from finereg.weight.l2 import canonical_name  # noqa: F401

    helpers = {"canonical_name", "IndexedDataset", "VARIANTS", "ConversionReport", "GroupPenalty", "BSS_METHODS"}
    assert not helpers & set(finereg.__all__)
    assert "param_groups" in finereg.__all__


def test_one_name_per_concept():
    """README, Conventions: ``factor`` is the one coefficient of single-coefficient weight penalties, ``temperature``
    the one temperature; L2-SP keeps the paper's alpha / beta; compat.tllib keeps tllib's names."""
    import inspect

    from finereg.compat import tllib

    params = lambda obj: set(inspect.signature(obj).parameters)
    for cls in (
        finereg.L2,
        finereg.Orthogonality,
        finereg.SoftOrthogonality,
        finereg.DoubleSoftOrthogonality,
        finereg.MutualCoherence,
        finereg.SRIP,
        finereg.CallablePenalty,
    ):
        assert "factor" in params(cls) and not {"coef", "alpha", "weight_decay"} & params(cls), cls
    assert {"alpha", "beta"} <= params(finereg.L2SP)
    for fn in (finereg.kd_loss, finereg.KnowledgeDistillation, finereg.BiTuning):
        assert "temperature" in params(fn) and "T" not in params(fn), fn
    assert "T" in params(tllib.KnowledgeDistillationLoss) and "T" in params(tllib.BiTuning)
    # output losses carry no coefficient
    for fn in (finereg.behavioral_penalty, finereg.kd_loss, finereg.co_tuning_loss, finereg.bi_tuning_loss):
        assert not {"trade_off", "factor", "weight"} & params(fn), fn


def test_core_import_needs_only_torch():
    """``import finereg`` pulls in no optional dependency beyond what ``import torch`` itself loads."""
    import subprocess
    import sys

    code = (
        "import sys, torch; before = set(sys.modules); import finereg; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "heavy = new & {'torchvision', 'timm', 'transformers', 'tqdm', 'matplotlib', 'sklearn', 'tensorboard', "
        "'PIL', 'scipy', 'lightning', 'accelerate', 'pytorch_lightning'}; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_is_pre_1_0_and_agrees_with_pyproject():
    """Issue 17 item 23: a version that says it is pre-1.0 (a minor version may rename, with a FutureWarning for
    one minor version; CHANGELOG.md), the same in pyproject.toml and ``finereg.__version__``."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert finereg.__version__ == declared
    assert re.fullmatch(r"0\.\d+\.\d+(\.dev\d+|rc\d+)?", declared), declared
    changelog = (root / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog
