"""The official SPD and FTP trajectories (tests/data/robust_reference.pt, see GOLDEN.md) through finereg's wrappers
around torch's own Adam / SGD / AdamW, with every form of anchors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finereg.optim import FTP, SPD

from ..conftest import DATA
from ._reference import golden_model


@pytest.fixture(scope="module")
def ref():
    return torch.load(DATA / "robust_reference.pt", weights_only=True)


def build(ref, case, anchors_form):
    model = golden_model(ref)
    cfg = ref["cases"][case]["cfg"]
    names = ref["names"]
    anchors = {
        "list": [ref["anchors"][n] for n in names],
        "state_dict": ref["anchors"],
        "module": golden_model({"start": ref["anchors"]}),
    }[anchors_form]
    params = model.named_parameters() if anchors_form == "state_dict" else model.parameters()
    extra = {"model": model} if anchors_form == "module" else {}
    if case == "spd_adam":
        inner = torch.optim.Adam(params, lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"])
        return model, SPD(inner, anchors, weight_decay=cfg["weight_decay"], **extra)
    if case == "ftp_sgd":
        inner = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        # the head excluded by name (list form: the head's parameters themselves)
        exclude = ref["cases"][case]["exclude"] if anchors_form != "list" else list(model[6].parameters())
        if anchors_form == "list":
            extra = {}
        return model, FTP(inner, anchors, k=cfg["k"], exclude=exclude, **extra)
    inner = torch.optim.AdamW(
        params, lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"], weight_decay=cfg["weight_decay"]
    )
    return model, FTP(inner, anchors, k=cfg["k"], **extra)


@pytest.mark.parametrize("anchors_form", ["list", "state_dict", "module"])
@pytest.mark.parametrize("case", ["spd_adam", "ftp_sgd", "ftp_adamw"])
def test_golden_trajectory(ref, case, anchors_form):
    model, opt = build(ref, case, anchors_form)
    for t in range(ref["steps"]):
        opt.zero_grad()
        F.cross_entropy(model(ref["x"]), ref["y"]).backward()
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref["cases"][case]["traj"][t][n], rtol=1e-6, atol=1e-8)


def test_golden_projections_act(ref):
    """The golden cases exercise the projections: without them the trajectories differ."""
    for case, inner in [
        ("spd_adam", lambda ps, c: torch.optim.Adam(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"])),
        (
            "ftp_sgd",
            lambda ps, c: torch.optim.SGD(ps, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"]),
        ),
    ]:
        model = golden_model(ref)
        opt = inner(model.parameters(), ref["cases"][case]["cfg"])
        opt.zero_grad()
        F.cross_entropy(model(ref["x"]), ref["y"]).backward()
        opt.step()
        final = ref["cases"][case]["traj"][0]
        assert max((p - final[n]).abs().max().item() for n, p in model.named_parameters()) > 1e-4, case


def test_ftp_first_step_projects_almost_onto_the_anchor(ref):
    """γ = 1e-8 at a tensor's first step: every non-excluded tensor lands within 1e-6 of θ0."""
    model, opt = build(ref, "ftp_sgd", "state_dict")
    opt.zero_grad()
    F.cross_entropy(model(ref["x"]), ref["y"]).backward()
    opt.step()
    for n, p in model.named_parameters():
        gap = (p - ref["anchors"][n]).abs().max().item()
        assert (gap < 1e-6) == (not n.startswith("6.")), (n, gap)
