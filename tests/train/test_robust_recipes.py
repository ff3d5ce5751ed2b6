"""The robust fine-tuning methods in the engine (spd, ftp, l2sp-decoupled, tpgm, lp-ft): defaults, combinations,
tiny runs, steps equal to the library's on the same model and batches, bit-exact resume, TPGM's data."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from finereg import FTP, SPD, TPGM, DecoupledL2SP, fit_linear_probe
from finereg._checks import FineregError
from finereg.train.build import param_groups
from finereg.train.checkpoint import load_checkpoint
from finereg.train.data import TensorImages, derive_seed, epoch_plan
from finereg.train.datasets import load_data
from finereg.train.loop import FitConfig, fit
from finereg.train.methods import build_recipes, default_weight_decay, method_names
from finereg.train.models import build_model
from finereg.train.probe import pretrained_features
from finereg.train.recipes.robust import ValidStream
from tests.train._util import image_folder, png

QUIET = dict(log=lambda m: None)
NEW = ["spd", "ftp", "l2sp-decoupled", "tpgm", "lp-ft"]
CPU = torch.device("cpu")


def test_registered_after_the_others_with_the_official_defaults():
    assert method_names()[-5:] == NEW
    r = {m: build_recipes(m)[0] for m in NEW}
    assert r["spd"].hp == {"weight_decay": 1.0, "anchor_head": False}
    assert r["tpgm"].hp == {"freq": 1, "iters": 1, "post_hoc_iters": 0, "lr": 0.01, "norm": "mars"}
    assert r["lp-ft"].hp == {"lr_mult": 0.1, "batchnorm_eval": False}
    assert r["ftp"].hp == {"k": 1.0, "mu": 0.01, "norm": "mars"}
    assert r["l2sp-decoupled"].hp == {"alpha": 0.1, "beta": 0.1}
    # the wrappers replace SGD's weight decay (official scripts: 0); TPGM and LP-FT keep tllib's 5e-4
    wd = {m: default_weight_decay(build_recipes(m)) for m in NEW}
    assert wd == {"spd": 0.0, "ftp": 0.0, "l2sp-decoupled": 0.0, "tpgm": 5e-4, "lp-ft": 5e-4}
    assert default_weight_decay(build_recipes("lp-ft+l2sp")) == 0.0


@pytest.mark.parametrize(
    "spec,match",
    [
        ("spd+ftp", "spd and ftp both wrap the optimizer.*cannot be combined: keep one of them"),
        ("ftp+l2sp-decoupled", "ftp and l2sp-decoupled both wrap the optimizer"),
        ("l2sp+l2sp-decoupled", "l2sp-decoupled cannot be combined with l2sp: both are L2-SP"),
        ("tpgm+spd", "tpgm and spd both project the weights back towards the pretrained ones"),
        ("ftp+tpgm", "ftp and tpgm both project"),
    ],
)
def test_combinations_that_cannot_run_are_refused(spec, match):
    with pytest.raises(FineregError, match=match):
        build_recipes(spec)


def test_combinations_that_can_run_are_built():
    names = lambda spec: [r.name for r in build_recipes(spec)]  # noqa: E731
    assert names("lp-ft+l2sp") == ["lp-ft", "l2sp", "head-l2"]
    assert names("ftp+bss") == ["ftp", "bss"] and names("spd+bss") == ["spd", "bss"]
    assert names("l2sp-decoupled+delta") == ["l2sp-decoupled", "delta"]  # β decays the head: no head-l2 on top
    assert names("tpgm+l2sp-decoupled") == ["tpgm", "l2sp-decoupled"] and names("ftp+bi-tuning") == ["ftp", "bi-tuning"]
    with pytest.raises(FineregError, match="tpgm.freq=0 and tpgm.post_hoc_iters=0 leave TPGM nothing to do"):
        build_recipes("tpgm", {"tpgm": {"freq": 0}})


@pytest.mark.parametrize(
    "method,terms,wrapper",
    [
        ("spd", [], "SPD"),
        ("ftp", [], "FTP"),
        ("l2sp-decoupled", [], "DecoupledL2SP"),
        ("tpgm", [], None),
        ("lp-ft", [], None),
        ("lp-ft+l2sp", ["l2sp", "l2_head"], None),
        ("ftp+bss", ["bss"], "FTP"),
        ("spd+bss", ["bss"], "SPD"),
        ("l2sp-decoupled+delta", ["delta"], "DecoupledL2SP"),
        ("ftp+bi-tuning", ["contrastive"], "FTP"),
    ],
)
def test_each_method_runs_a_tiny_epoch(tmp_path, tiny, method, terms, wrapper):
    res = fit(tiny(tmp_path, method=method, epochs=1), **QUIET)
    row = res.final
    assert set(k for k in row if k.startswith("train_") and k not in ("train_loss", "train_acc")) == {
        f"train_{t}" for t in ["ce", *terms]
    }
    assert all(torch.isfinite(torch.tensor(row[f"train_{t}"])) for t in ["ce", *terms])
    assert 0 <= row["test_top1"] <= 100 and 0 <= row["valid_top1"] <= 100
    ck = load_checkpoint(res.run_dir)
    keys = [k for k in ck["optimizer"] if k.startswith("finereg.")]
    assert keys == ([f"finereg.{wrapper}"] if wrapper else [])


# ----------------------------------------------------------------------------- the library's steps
def _engine_steps(tmp_path, tiny, method):
    """The network's weights after each step of the first epoch of a tiny run."""
    seen = []

    def grab(info):
        seen.append({k: v.detach().clone() for k, v in info.model.state_dict().items()})
        if info.step == 3:
            raise KeyboardInterrupt

    fit(tiny(tmp_path, method=method, epochs=1), on_step=grab, **QUIET)
    return seen


def _library_steps(method, plain=False):
    """The same three steps written with the library: the pretrained network with the engine's head init, the
    engine's SGD groups, the library wrapper (or TPGM / the linear probe), the same batches."""
    data = load_data("digits", sample_rate=30)
    torch.manual_seed(derive_seed(0, 0xC0FFEE))
    net = build_model("builtin", 5, in_channels=1).net
    head = list(net.head.parameters())
    wd = 5e-4 if method in ("tpgm", "lp-ft") else 0.0
    lr = 0.05
    if method == "lp-ft" and not plain:
        x, y = pretrained_features(net, data.train, 16, CPU)
        vx, vy = pretrained_features(net, data.valid, 16, CPU)
        fit_linear_probe(x, y, vx, vy, num_classes=5, seed=0).load_into(net.head)
        lr *= 0.1
    opt = torch.optim.SGD(
        param_groups(net, lr, pretrained_lr_mult=0.1), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True
    )
    after = lambda: None  # noqa: E731
    if not plain:
        if method == "spd":
            opt = SPD(opt, weight_decay=1.0, exclude=head)
        elif method == "ftp":
            opt = FTP(opt, exclude=head)
        elif method == "l2sp-decoupled":
            opt = DecoupledL2SP(opt, alpha=0.1, beta=0.1, new_params=head)
        elif method == "tpgm":
            stream = ValidStream(data.valid, 16, derive_seed(0, 0x7A6D), CPU)
            tpgm = TPGM(net, stream, exclude=head)
            after = lambda: tpgm.project_(1)  # noqa: E731
    order, seeds = epoch_plan(len(data.train), 16, 3, 0, 0)
    net.train()
    out = []
    for b in data.train.train_batches(order, seeds, 1, CPU):
        loss = F.cross_entropy(net(b.x).logits, b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after()
        out.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return out


@pytest.mark.parametrize("method", NEW)
def test_steps_equal_the_library_on_the_same_model(tmp_path, tiny, method):
    engine, library, plain = _engine_steps(tmp_path, tiny, method), _library_steps(method), _library_steps(method, True)
    assert len(engine) == len(library) == 3
    for e, lib in zip(engine, library):
        assert e.keys() == lib.keys() and all(torch.equal(e[k], lib[k]) for k in e)
    # and the method did something: plain SGD (from the random head) ends elsewhere
    assert not all(torch.equal(engine[-1][k], plain[-1][k]) for k in plain[-1])


# ------------------------------------------------------------------------------------ exact resume
def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method", NEW)
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, tiny, method):
    full = fit(tiny(tmp_path / "a", method=method), **QUIET)

    def stop(info):
        if info.epoch == 0 and info.step == 2:
            raise KeyboardInterrupt

    part = fit(tiny(tmp_path / "b", method=method), on_step=stop, **QUIET)
    assert part.interrupted
    resumed = fit(FitConfig(resume=str(part.run_dir), progress=False), **QUIET)
    assert not resumed.interrupted and resumed.epochs_done == 2
    a, b = load_checkpoint(full.run_dir), load_checkpoint(resumed.run_dir)
    assert _same_state(a["net"], b["net"])
    assert _same_state(a["optimizer"], b["optimizer"])  # SGD's buffers and the wrapper's state (θ0, γ, moments)
    assert _same_state(a["recipes"], b["recipes"])  # TPGM's radii and Adam state, LP-FT's probe
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    if method == "tpgm":  # the state that resume restores is the live one
        st = a["recipes"]["tpgm"]
        assert st["steps"] == 6 and st["drawn"] == 6 and st["tpgm"]["initialized"]
    if method == "ftp":
        assert any("gamma" in s for s in a["optimizer"]["finereg.FTP"]["state"].values())


# ---------------------------------------------------------------------------------------------- TPGM
def _fingerprint(images: TensorImages) -> str:
    return hashlib.md5(images.images.numpy().tobytes()).hexdigest()


def test_tpgm_learns_on_the_validation_split_only(tmp_path, tiny, monkeypatch):
    """Every image TPGM's fit sees is a validation image; the test split is read only by the epoch's evaluation."""
    inside = {"fit": False}
    read = []  # (images fingerprint, during TPGM fit)
    fit_inputs = []
    orig_fit, orig_eval = TPGM.fit, TensorImages.eval_batches

    def fit_spy(self, steps):
        inside["fit"] = True
        hook = self.model.register_forward_pre_hook(lambda m, args: fit_inputs.append(args[0].detach().clone()))
        try:
            return orig_fit(self, steps)
        finally:
            hook.remove()
            inside["fit"] = False

    def eval_spy(self, *args, **kwargs):
        for b in orig_eval(self, *args, **kwargs):
            read.append((_fingerprint(self), inside["fit"]))
            yield b

    monkeypatch.setattr(TPGM, "fit", fit_spy)
    monkeypatch.setattr(TensorImages, "eval_batches", eval_spy)
    fit(tiny(tmp_path, method="tpgm"), **QUIET)
    data = load_data("digits", sample_rate=30)
    valid, test = _fingerprint(data.valid), _fingerprint(data.test)
    assert len(fit_inputs) == 6  # one validation batch per step (freq 1, iters 1)
    assert {fp for fp, during in read if during} == {valid}
    assert any(fp == test and not during for fp, during in read)  # the evaluation, outside TPGM
    pool = data.valid.eval_batches(len(data.valid), CPU).__next__().x.flatten(1)
    seen = torch.cat(fit_inputs).flatten(1)
    assert bool((seen[:, None, :] == pool[None]).all(-1).any(1).all())  # each input is a validation image


def test_tpgm_post_hoc_projects_once_after_the_last_step(tmp_path, tiny, monkeypatch):
    calls = []
    orig = TPGM.project_
    monkeypatch.setattr(TPGM, "project_", lambda self, steps: calls.append(steps) or orig(self, steps))
    fit(tiny(tmp_path, method="tpgm", set={"tpgm.freq": 0, "tpgm.post_hoc_iters": 4}), **QUIET)
    assert calls == [4]


def test_tpgm_without_a_validation_split_says_how_to_add_one(tmp_path):
    root = tmp_path / "data"
    image_folder(root, per_class=4)
    cfg = FitConfig(data=str(root), arch="resnet18", weights="none", method="tpgm", image_size=16, epochs=1,
                    iters_per_epoch=1, batch_size=4, workers=0, out=str(tmp_path / "run"), progress=False,
                    tensorboard=False)  # fmt: skip
    with pytest.raises(FineregError, match="tpgm learns its radii on a validation split.*add ROOT/valid/<class>"):
        fit(cfg, **QUIET)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made a run


# --------------------------------------------------------------------------------------------- LP-FT
def test_lp_ft_starts_from_the_probe_at_a_tenth_of_the_learning_rate(tmp_path, tiny):
    logs = []
    res = fit(tiny(tmp_path, method="lp-ft"), log=logs.append)
    assert [r["lr"] for r in res.history] == pytest.approx([0.005, 0.0005])
    probe = load_checkpoint(res.run_dir)["recipes"]["lp-ft"]["probe"]
    assert probe["weight"].shape == (5, 128) and probe["bias"].shape == (5,)
    assert any("L2" in m and "chosen on the validation split" in m for m in logs)


@pytest.mark.parametrize("keep", [True, False])
def test_lp_ft_batchnorm_eval_keeps_the_pretrained_statistics(tmp_path, keep):
    """ResNet-18 (BatchNorm) on an ImageFolder with a valid/ split: with lp-ft.batchnorm_eval the running statistics
    never move during training; without it they do."""
    root = tmp_path / "data"
    image_folder(root, per_class=4)
    for c, name in enumerate(("cat", "dog")):
        for i in range(2):
            png(root / "valid" / name / f"{i}.png", 60 * c + 20 * i + 5)
    cfg = FitConfig(data=str(root), arch="resnet18", weights="none", method="lp-ft",
                    set={"lp-ft.batchnorm_eval": keep}, image_size=16, epochs=1, iters_per_epoch=2, batch_size=4,
                    workers=0, out=str(tmp_path / "run"), progress=False, tensorboard=False)  # fmt: skip
    logs = []
    res = fit(cfg, log=logs.append)
    assert any("chosen on the validation split" in m for m in logs)  # the ImageFolder's valid/ chose λ
    net = load_checkpoint(res.run_dir)["net"]
    means = [v for k, v in net.items() if k.endswith("running_mean")]
    tracked = [int(v) for k, v in net.items() if k.endswith("num_batches_tracked")]
    assert len(means) == 20
    if keep:  # random init: mean 0, nothing tracked
        assert all(torch.equal(m, torch.zeros_like(m)) for m in means) and set(tracked) == {0}
    else:
        assert not all(torch.equal(m, torch.zeros_like(m)) for m in means) and set(tracked) == {2}
