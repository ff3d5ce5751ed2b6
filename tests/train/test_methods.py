"""Method recipes: the registry, overrides, combinations, one tiny run of every method, and that each recipe's
loss term is the library regularizer's value (the engine holds no regularizer math of its own)."""

from pathlib import Path

import pytest
import torch

from finereg._checks import FineregError
from finereg.train.loop import fit
from finereg.train.methods import (
    build_recipes,
    method_groups,
    method_names,
    parse_method,
    parse_methods,
    parse_overrides,
    registered,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"

QUIET = dict(log=lambda m: None)


def test_registry_and_parsing():
    assert method_names() == [
        *("erm", "l2", "l2sp", "delta", "delta-attention", "bss", "lwf", "co-tuning", "bi-tuning"),
        *("spd", "ftp", "l2sp-decoupled", "tpgm", "lp-ft"),  # recipes/robust.py, registered after the others
    ]
    assert parse_method("L2SP+bss") == ["l2sp", "bss"]
    assert parse_method("delta:attention") == ["delta-attention"]
    assert parse_method("erm+co_tuning") == ["co-tuning"]
    with pytest.raises(KeyError, match="no method named 'l2sq'; did you mean one of: 'l2sp'"):
        parse_method("l2sq")
    with pytest.raises(ValueError, match="appears twice"):
        parse_method("bss+bss")
    assert parse_overrides(["bss.trade_off=0.01", "lwf.temperature=2", "delta.layers=backbone.conv3"]) == {
        "bss": {"trade_off": 0.01},
        "lwf": {"temperature": 2},
        "delta": {"layers": "backbone.conv3"},
    }


def test_groups_of_the_bench():
    tllib = ["erm", "l2", "l2sp", "delta", "delta-attention", "bss", "lwf", "co-tuning", "bi-tuning"]
    robust = ["spd", "ftp", "l2sp-decoupled", "tpgm", "lp-ft"]
    assert method_names("tllib") == tllib and method_names("robust") == robust
    assert set(method_groups()) == {"tllib", "robust"}
    assert parse_methods(["robust"]) == robust and parse_methods(["all"]) == tllib + robust
    assert parse_methods(["erm", "L2-SP+bss", "robust"]) == ["erm", "l2sp+bss", *robust]
    assert parse_methods(["tllib", "l2sp"]).count("l2sp") == 2  # the bench refuses the repeat (test_bench)
    with pytest.raises(KeyError, match="no method group named 'robst'"):
        method_names("robst")
    with pytest.raises(KeyError, match="no method named 'robst'"):
        parse_methods(["robst"])


def test_docs_table_lists_every_method():
    """docs/methods.md has one table row per registered method, with its defaults' source named."""
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    named = {line.split("`")[1] for line in rows}
    assert set(method_names()) <= named, sorted(set(method_names()) - named)


def test_defaults_are_tllibs_and_overrides_apply():
    r = {x.name: x for x in build_recipes("l2sp+delta+bss+lwf+co-tuning")}
    assert r["l2sp"].hp == {"trade_off": 0.01} and r["delta"].hp["trade_off"] == 0.01
    assert r["bss"].hp == {"trade_off": 0.001, "k": 1}
    assert r["lwf"].hp == {"trade_off": 4.0, "temperature": 3.0, "source_head": "excluded"}
    assert r["co-tuning"].hp["trade_off"] == 2.3
    assert r["head-l2"].hp == {"trade_off": 0.01}  # tllib's DELTA script: head L2 0.01, added once
    bi = {"trade_off": 1.0, "K": 40, "m": 0.999, "temperature": 0.07, "projection_dim": 128, "projector": "pretrained"}
    assert registered("bi-tuning")().hp == bi
    for data, t in (("digits", 0.001), ("mnist5k", 0.0001)):  # tllib's 0.01 diverges on both (recipes/feature.py)
        on = {x.name: x for x in build_recipes("delta+bss", data=data)}
        assert on["delta"].hp["trade_off"] == t and on["bss"].hp["trade_off"] == 0.001
        assert build_recipes("delta-attention", data=data)[0].hp["trade_off"] == t
    assert build_recipes("delta", parse_overrides(["delta.trade_off=0.05"]), data="mnist5k")[0].hp["trade_off"] == 0.05
    over = {x.name: x for x in build_recipes("bss+delta", parse_overrides(["bss.k=2", "head-l2.trade_off=0"]))}
    assert over["bss"].hp["k"] == 2 and over["head-l2"].hp["trade_off"] == 0
    assert "head-l2" not in {x.name for x in build_recipes("bss")}


@pytest.mark.parametrize(
    "spec,kw,exc,match",
    [
        ("bss", {"bss": {"kk": 1}}, KeyError, "hyper-parameter of 'bss' named 'kk'"),
        ("bss", {"bss": {"k": "two"}}, FineregError, "bss.k must be an integer >= 1, got 'two'"),
        ("bss", {"bss": {"k": 2.7}}, FineregError, "bss.k must be an integer >= 1, got 2.7"),
        ("bss", {"bss": {"k": True}}, FineregError, "bss.k must be an integer >= 1, got True"),
        ("bss", {"bss": {"trade_off": -1}}, FineregError, "bss.trade_off must be a finite number >= 0, got -1"),
        ("lwf", {"lwf": {"temperature": 0}}, FineregError, "lwf.temperature must be a finite number > 0, got 0"),
        ("delta", {"delta": {"layers": 3}}, FineregError, "delta.layers must be comma-separated names, got 3"),
        ("bi-tuning+bss", {}, ValueError, "bi-tuning replaces the network's forward.*cannot be combined with bss"),
        ("bi-tuning+lwf", {}, ValueError, "cannot be combined with lwf"),
        ("co-tuning", {"co-tuning": {"relationship": "sideways"}}, FineregError, "one of 'direct', 'reverse'"),
        ("l2sp", {"bss": {"k": 1}}, ValueError, "--set names method 'bss', which is not in 'l2sp'"),
    ],
)
def test_bad_method_settings(spec, kw, exc, match):
    with pytest.raises(exc, match=match):
        build_recipes(spec, kw)


@pytest.mark.parametrize(
    "method",
    [
        "l2",
        "l2sp",
        "delta",
        "delta-attention",
        "bss",
        "lwf",
        "co-tuning",
        "bi-tuning",
        "l2sp+delta+bss",
        "lwf+co-tuning",
    ],
)
def test_each_method_runs_a_tiny_epoch(tmp_path, tiny, method):
    res = fit(tiny(tmp_path, method=method, epochs=1), **QUIET)
    row = res.final
    expected = {
        "l2": ["l2", "l2_head"],
        "l2sp": ["l2sp", "l2_head"],
        "delta": ["delta", "l2_head"],
        "delta-attention": ["delta", "l2_head"],
        "bss": ["bss"],
        "lwf": ["kd"],
        "co-tuning": ["co_tuning"],
        "bi-tuning": ["contrastive"],
        "l2sp+delta+bss": ["l2sp", "delta", "bss", "l2_head"],
        "lwf+co-tuning": ["kd", "co_tuning"],
    }[method]
    for term in ["ce", *expected]:
        assert f"train_{term}" in row and torch.isfinite(torch.tensor(row[f"train_{term}"]))
    assert row["train_loss"] == pytest.approx(sum(row[f"train_{t}"] for t in ["ce", *expected]), rel=1e-5)
    assert 0 <= row["test_top1"] <= 100


def _first_step_terms(tmp_path, tiny, method, **kw):
    seen = {}

    def grab(info):
        if not seen:
            seen.update(info.terms)
            seen["model"] = info.model
        raise KeyboardInterrupt

    fit(tiny(tmp_path, method=method, epochs=1, **kw), on_step=grab, **QUIET)
    return seen


def test_terms_equal_the_library_regularizers(tmp_path, tiny):
    """The first step's terms, recomputed from the library with the pretrained model on the first batch."""
    from finereg.feature.bss import batch_spectral_shrinkage
    from finereg.feature.delta import behavioral_penalty
    from finereg.train.data import epoch_plan
    from finereg.train.datasets import load_data
    from finereg.train.models import build_model

    terms = _first_step_terms(tmp_path / "a", tiny, "delta+bss+lwf")  # computed before the first update
    data = load_data("digits", sample_rate=30)
    order, seeds = epoch_plan(len(data.train), 16, 3, 0, 0)
    batch = next(data.train.train_batches(order, seeds, 1, torch.device("cpu")))
    net = build_model("builtin", 5, in_channels=1).net.eval()
    feats = {}
    hooks = [
        getattr(net.backbone, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
        for n in ("conv2", "conv3")
    ]
    with torch.no_grad():
        f = net.backbone(batch.x)
    for h in hooks:
        h.remove()
    assert terms["delta"] == pytest.approx(0.0, abs=1e-6)  # same weights: source and target maps agree
    assert terms["bss"] == pytest.approx(0.001 * float(batch_spectral_shrinkage(f, 1)), rel=1e-4)
    with torch.no_grad():
        src = net.source_head(f)
    # LwF's recorded targets are the pretrained outputs on the un-augmented images; the KD term compares them with
    # the source head's outputs on the augmented batch
    clean = next(data.train.eval_batches(len(data.train), torch.device("cpu"))).x[batch.index]
    from finereg.head.kd import kd_loss

    with torch.no_grad():
        expected = 4.0 * float(kd_loss(src, net.source_head(net.backbone(clean)), temperature=3.0))
    assert terms["kd"] == pytest.approx(expected, rel=1e-4)
    assert behavioral_penalty(feats, feats) == 0


def test_channel_attention_layers_must_be_convolutions(tmp_path, tiny):
    """Before: --set delta-attention.layers=backbone.norm2 crashed with an AttributeError."""
    with pytest.raises(FineregError, match="'backbone.norm2' is a GroupNorm, which has no output channels to rank"):
        fit(tiny(tmp_path, method="delta-attention", set={"delta-attention.layers": "backbone.norm2"}), **QUIET)
