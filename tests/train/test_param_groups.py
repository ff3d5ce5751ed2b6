"""The engine's optimizer groups come from the one learning-rate policy (finereg.lr_policy) and equal tllib's
get_parameters layout for every method; finereg's deviations are options."""

import pytest

from finereg.train import dist as fdist
from finereg.train.build import build
from finereg.train.config import FitConfig
from finereg.train.methods import method_names
from finereg.train.run_dir import RunDir
from tests.test_lr_policy import TLLIB_LAYOUTS

# the engine's part -> tllib's attribute; tllib's classifiers add an (empty, identity) bottleneck group
ENGINE_TO_TLLIB = {"backbone": "backbone", "head": "head", "source_head": "head_source", "projector": "projector"}
TLLIB_PLAIN = [("backbone", 0.1), ("bottleneck", 1.0), ("head", 1.0)]  # tllib.modules.classifier.Classifier


def _part(name: str) -> str:
    """The module a parameter belongs to: ``head.weight`` -> head; Bi-Tuning's ``encoder_q.projector.0.weight`` ->
    projector."""
    parts = name.split(".")
    return parts[1] if parts[0] == "encoder_q" else parts[0]


def _groups(tmp_path, method, **settings):
    cfg = FitConfig(method=method, set=settings, out=str(tmp_path / method), batch_size=16, sample_rate=30,
                    progress=False, tensorboard=False)  # fmt: skip
    with RunDir(cfg.out) as rd:
        run = build(cfg, rd, fdist.setup_distributed("cpu"), lambda m: None)
        try:
            owner = {id(p): _part(n) for n, p in run.model.named_parameters()}
            groups = {}
            for g in run.optimizer.param_groups:
                if not g["params"]:  # an identity bottleneck: an empty group, as in tllib
                    continue
                parts = {owner[id(p)] for p in g["params"]}
                assert len(parts) == 1, parts  # one module per group
                groups[parts.pop()] = g["lr"] / run.cfg.lr
            return groups
        finally:
            run.close()


def _tllib(layout):
    return {attr: mult for attr, mult in layout if attr != "bottleneck"}  # the engine has no bottleneck


@pytest.mark.parametrize("method", method_names("tllib"))
def test_engine_groups_are_tllibs_layout(tmp_path, method):
    got = _groups(tmp_path, method)
    got = {ENGINE_TO_TLLIB.get(k, k): v for k, v in got.items()}
    if method == "lwf":
        expected = _tllib(TLLIB_LAYOUTS["lwf"])
        expected["head"] = expected.pop("head_target")
    elif method == "co-tuning":
        expected = _tllib(TLLIB_LAYOUTS["co_tuning"])
        expected["head"] = expected.pop("head_target")
    elif method == "bi-tuning":
        expected = _tllib(TLLIB_LAYOUTS["bi_tuning"])
    else:
        expected = _tllib(TLLIB_PLAIN)
    assert got == pytest.approx(expected), method


@pytest.mark.parametrize("method", method_names("robust"))
def test_robust_methods_keep_the_plain_layout(tmp_path, method):
    """tllib has none of them: their groups are the plain classifier's (backbone at 0.1x, the new head at 1x),
    which LP-FT's stage 2 scales by its lr_mult (0.1: the official sweeps' grid 10x below fine-tuning's)."""
    scale = 0.1 if method == "lp-ft" else 1.0
    assert _groups(tmp_path, method) == pytest.approx({k: v * scale for k, v in _tllib(TLLIB_PLAIN).items()})


def test_deviations_from_tllib_are_options(tmp_path):
    assert _groups(tmp_path / "a", "lwf", **{"lwf.source_head": "pretrained"}) == pytest.approx(
        {"backbone": 0.1, "head": 1.0, "source_head": 0.1}  # LwF's paper trains the old task's head
    )
    assert _groups(tmp_path / "b", "bi-tuning", **{"bi-tuning.projector": "new"})["projector"] == pytest.approx(1.0)
