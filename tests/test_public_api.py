"""The public names promised by the README import from the top-level package and its subpackages."""

import importlib

import pytest

import finereg

SUBPACKAGES = [
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
