"""``finereg wise-ft RUN``: the sweep's table, its end points, the choice on validation, and what it refuses."""

import csv
import json

import torch

from finereg import fit_linear_probe
from finereg.train.checkpoint import load_checkpoint
from finereg.train.cli import main
from finereg.train.datasets import load_data
from finereg.train.loop import FitConfig, evaluate, fit, load_trained
from finereg.train.models import build_model
from finereg.train.probe import pretrained_features
from finereg.train.wise_ft import wise_ft_run
from tests.train._util import image_folder

QUIET = dict(log=lambda m: None)
CPU = torch.device("cpu")


def _rows(run):
    with open(run / "wise_ft.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_sweep_of_a_finished_run_writes_its_table_with_exact_end_points(tmp_path, tiny, capsys):
    res = fit(tiny(tmp_path, method="erm"), **QUIET)
    run = res.run_dir
    assert main(["wise-ft", str(run), "--alphas", "0,0.5,1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(run)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    metrics = ["test_top1", "test_mean_class_acc", "test_loss", "valid_top1", "valid_mean_class_acc", "valid_loss"]
    # α = 1 is the run's fine-tuned network: the run's last evaluation, to the last digit
    assert {k: rows[2][k] for k in metrics} == {k: res.final[k] for k in metrics}
    # α = 0 is the pretrained network with the linear-probe head, built here from the library
    data = load_data("digits", sample_rate=30)
    net = build_model("builtin", 5, in_channels=1).net.eval()
    b = 256  # wise-ft's batch: the epochs' evaluation batch, max(batch, 256)
    x, y = pretrained_features(net, data.train, b, CPU)
    vx, vy = pretrained_features(net, data.valid, b, CPU)
    fit_linear_probe(x, y, vx, vy, num_classes=5, seed=0).load_into(net.head)
    theta0 = {**evaluate(net, data.test, b, CPU, 5), **evaluate(net, data.valid, b, CPU, 5, prefix="valid")}
    assert {k: rows[0][k] for k in metrics} == {k: theta0[k] for k in metrics}
    # α chosen on validation (of the best, the largest α), never on test; the JSON says the same
    best = max(rows, key=lambda r: (r["valid_top1"], r["alpha"]))
    doc = json.loads((run / "wise_ft.json").read_text())
    assert doc["chosen_alpha"] == best["alpha"] and doc["selected_on"] == "valid_top1"
    assert [r["chosen"] for r in rows] == [float(r is best) for r in rows]
    assert doc["theta0"]["batchnorm_recomputed"] is False  # the built-in network has GroupNorm
    assert f"alpha {best['alpha']:g} chosen" in out and "wise_ft.csv" in out


def test_without_a_validation_split_every_alpha_is_reported_and_none_chosen(tmp_path, monkeypatch):
    """An ImageFolder without valid/, a torchvision ResNet-18 (BatchNorm: statistics recomputed between the end
    points, not at them)."""
    import torchvision

    root = tmp_path / "data"
    image_folder(root, per_class=4)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    cfg = FitConfig(data=str(root), arch="resnet18", weights=str(weights), image_size=16, epochs=1,
                    iters_per_epoch=2, batch_size=4, workers=0, out=str(tmp_path / "run"), progress=False,
                    tensorboard=False)  # fmt: skip
    res = fit(cfg, **QUIET)
    calls = []
    update_bn = torch.optim.swa_utils.update_bn
    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", lambda *a, **k: calls.append(1) or update_bn(*a, **k))
    logs = []
    out = wise_ft_run(res.run_dir, [0, 0.5, 1], log=logs.append)
    assert out.chosen_alpha is None and "has no validation split" in out.reason
    assert [r["alpha"] for r in out.rows] == [0, 0.5, 1] and not any("valid_top1" in r for r in out.rows)
    assert out.rows[-1]["test_top1"] == res.final["test_top1"]
    assert out.rows[-1]["test_loss"] == res.final["test_loss"]
    assert calls == [1]  # α = 0.5 only
    assert out.theta0["batchnorm_recomputed"] is True
    assert any("20 % holdout of the training features" in m for m in logs)  # θ0's probe: λ never on test
    assert [r["chosen"] for r in _rows(res.run_dir)] == [0.0, 0.0, 0.0]
    assert not (res.run_dir / "wise_ft.pt").exists()  # no α chosen: no merged model
    assert load_checkpoint(res.run_dir)["epoch"] == 1  # the run itself is untouched


def test_overwrite_removes_the_previous_runs_wise_ft_results(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_args = ["--out", str(run), "--epochs", "1", "-i", "2", "-b", "16", "--no-progress", "--sample-rate", "30"]
    assert main(["fit", *tiny_args]) == 0
    assert main(["wise-ft", str(run), "--alphas", "0,1"]) == 0
    assert (run / "wise_ft.csv").is_file() and (run / "wise_ft.json").is_file()
    assert main(["fit", *tiny_args, "--overwrite", "--method", "l2sp"]) == 0
    assert not (run / "wise_ft.csv").exists() and not (run / "wise_ft.json").exists()  # another run's results
    assert not (run / "wise_ft.pt").exists()


def test_the_chosen_merged_network_is_saved_as_a_loadable_checkpoint(tmp_path, tiny):
    """``RUN/wise_ft.pt``: θ(α) of the chosen α, which ``load_trained`` loads and which evaluates as the sweep's
    row of that α; the run's own checkpoint is untouched."""
    res = fit(tiny(tmp_path, method="erm"), **QUIET)
    out = wise_ft_run(res.run_dir, [0, 0.5, 1], **QUIET)
    assert out.chosen_alpha is not None
    saved = load_checkpoint(res.run_dir / "wise_ft.pt")
    assert saved["wise_ft"]["alpha"] == out.chosen_alpha and saved["wise_ft"]["selected_on"] == "valid_top1"
    net = load_trained(res.run_dir / "wise_ft.pt")
    data = load_data("digits", sample_rate=30)
    got = {**evaluate(net, data.test, 256, CPU, 5), **evaluate(net, data.valid, 256, CPU, 5, prefix="valid")}
    assert {k: got[k] for k in ("test_top1", "test_loss", "valid_top1")} == {
        k: out.chosen[k] for k in ("test_top1", "test_loss", "valid_top1")
    }
    last = load_checkpoint(res.run_dir)
    assert last["net"].keys() == saved["net"].keys() and "wise_ft" not in last  # the run's own checkpoint
    assert not list(res.run_dir.glob(".*.tmp"))  # written atomically: no temporary file left


def test_a_tie_on_validation_chooses_the_larger_alpha(tmp_path, tiny, monkeypatch):
    """Every α scoring the same (a small validation split often does): the fine-tuned end, not α = 0."""
    import finereg.train.wise_ft as wf

    res = fit(tiny(tmp_path, method="erm"), **QUIET)
    monkeypatch.setattr(wf, "evaluate", lambda *a, prefix="test", **k: {f"{prefix}_top1": 50.0})
    out = wise_ft_run(res.run_dir, [0, 0.25, 0.5], **QUIET)
    assert out.chosen_alpha == 0.5 and "ties: the larger α" in out.reason
    assert load_checkpoint(res.run_dir / "wise_ft.pt")["wise_ft"]["alpha"] == 0.5
