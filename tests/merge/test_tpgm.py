"""TPGM: the official procedure (written out with a deep copy per step), validation loss going down, the
projection constraint, exact resume, and the test split kept out by construction."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import finereg
from finereg._checks import FineregError
from finereg.merge import TPGM

pytestmark = pytest.mark.usefixtures("one_thread")


def task(seed=0, n=64):
    """Data labelled by a fixed teacher network."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return teacher, x, y


def pretrained_and_finetuned():
    """θ0: the teacher moved far (mediocre on the task); θ: θ0 fine-tuned on training data (good)."""
    teacher, x, y = task(0, 128)
    pre = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.8 * torch.randn_like(p))
    model = copy.deepcopy(pre)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return pre, model


def val_batches():
    _, x, y = task(1, 64)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def official_tpgm(model, pre, batches, steps, lr=1e-2):
    """The official tpgm_trainer loop (deep copy of the model per step; ratio clamped to [0, 1] as the ResNet
    version; MARS norm per row with a 1-D tensor one row, as the ViT version)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gammas = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in names]
    opt = torch.optim.Adam(gammas, lr=lr)
    anchors = dict(pre.named_parameters())
    init = True

    def project(target, apply):
        nonlocal init
        for (name, p), g in zip(target.named_parameters(), gammas):
            t = p.detach() - anchors[name].detach()
            norms = t.abs().sum(dim=tuple(range(1, t.dim())), keepdim=True)
            with torch.no_grad():
                if init:
                    g.copy_(norms.min() / 2)
                g.copy_(g.clamp(1e-8, norms.max()))
            ratio = (g / (norms + 1e-8)).clamp(0, 1)
            new = anchors[name].detach() + t * ratio
            if apply:
                with torch.no_grad():
                    p.copy_(new)
            else:
                p.requires_grad = False
                p.copy_(new)
        init = False

    for i in range(steps):
        x, y = batches[i % len(batches)]
        copy_ = copy.deepcopy(model).eval()
        project(copy_, apply=False)
        loss = F.cross_entropy(copy_(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    project(model, apply=True)
    return torch.stack([g.detach() for g in gammas])


def test_matches_the_official_procedure():
    pre, model = pretrained_and_finetuned()
    ref_model = copy.deepcopy(model)
    gamma_ref = official_tpgm(ref_model, pre, val_batches(), steps=7)
    tpgm = TPGM(model, val_batches(), anchors=pre)
    tpgm.project_(steps=7)
    torch.testing.assert_close(tpgm.gamma.detach(), gamma_ref, rtol=1e-10, atol=1e-14)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def val_loss(model):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in val_batches())


def test_learned_radii_reduce_the_validation_loss():
    pre, model = pretrained_and_finetuned()
    start = copy.deepcopy(model)
    TPGM(start, val_batches(), anchors=pre).apply_()  # the projection at the initial radii (min norm / 2)
    tpgm = TPGM(model, val_batches(), anchors=pre)
    losses = tpgm.project_(steps=150)
    assert sum(losses[-10:]) / 10 < losses[0] - 0.05
    assert val_loss(model) < val_loss(start) - 0.1


@pytest.mark.parametrize("norm", ["mars", "l2"])
def test_projection_keeps_each_tensor_in_its_ball(norm):
    pre, model = pretrained_and_finetuned()
    tpgm = TPGM(model, val_batches(), anchors=pre, norm=norm)
    tpgm.project_(steps=5)
    for (name, p), a in zip(model.named_parameters(), pre.parameters()):
        d = p.detach() - a.detach()
        rows = d.abs().sum(dim=tuple(range(1, d.dim()))) if norm == "mars" else d.norm()
        assert float(rows.max()) <= tpgm.radii[name] * (1 + 1e-9) + 1e-12, name


def test_state_dict_resumes_exactly():
    pre, model = pretrained_and_finetuned()
    one = val_batches()[:1]
    a = TPGM(model, one, anchors=pre)
    a.fit(3)
    saved = copy.deepcopy(a.state_dict())
    a.fit(3)
    b = TPGM(model, one, anchors=dict(pre.named_parameters()))
    b.load_state_dict(saved)
    b.fit(3)
    assert torch.equal(a.gamma, b.gamma)


def test_only_validation_batches_reach_the_model():
    """The model sees exactly the validation inputs (recorded by a hook); no method takes other data."""
    pre, model = pretrained_and_finetuned()
    val = val_batches()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    tpgm = TPGM(model, val, anchors=pre)
    tpgm.project_(steps=5)
    tpgm.fit(2)
    tpgm.apply_()
    handle.remove()
    assert len(seen) == 7
    assert all(any(x is v for v, _ in val) for x in seen)
    for method in (TPGM.fit, TPGM.project_, TPGM.apply_):
        assert set(inspect.signature(method).parameters) <= {"self", "steps"}


def test_exclusions_and_frozen_parameters_are_not_projected():
    pre, model = pretrained_and_finetuned()
    model[0].bias.requires_grad_(False)
    tpgm = TPGM(model, val_batches(), anchors=pre, exclude="2.*")
    assert tpgm.names == ["0.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tpgm.project_(steps=2)
    for n in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(model.get_parameter(n), before[n])
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_errors():
    pre, model = pretrained_and_finetuned()
    with pytest.raises(FineregError, match="norm must be one of"):
        TPGM(model, val_batches(), anchors=pre, norm="linf")
    with pytest.raises(FineregError, match="matches no trainable parameter"):
        TPGM(model, val_batches(), anchors=pre, exclude="head.*")
    with pytest.raises(FineregError, match="val_batches must be"):
        TPGM(model, torch.zeros(3), anchors=pre)
    with pytest.raises(FineregError, match="yielded no batch"):
        TPGM(model, [], anchors=pre).fit(1)
    assert finereg.TPGM is TPGM


def test_a_non_finite_validation_loss_changes_neither_the_radii_nor_the_weights():
    pre, model = pretrained_and_finetuned()
    (x, y), _ = val_batches()
    bad = x.clone()
    bad[0, 0] = float("nan")
    tpgm = TPGM(model, [(x, y), (bad, y)], anchors=pre)
    tpgm.fit(1)
    radii = tpgm.radii
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FineregError, match="validation loss of TPGM step 1 is nan"):
        tpgm.project_(steps=1)
    assert tpgm.radii == radii and all(torch.isfinite(torch.tensor(list(radii.values()))))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_non_scalar_criterion_is_a_clear_error():
    pre, model = pretrained_and_finetuned()
    tpgm = TPGM(model, val_batches(), anchors=pre, criterion=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(FineregError, match=r"criterion must return a scalar loss tensor, got shape \(32,\)"):
        tpgm.fit(1)


def test_a_one_shot_generator_asks_for_a_re_iterable():
    """It said "yielded no batch" after yielding two."""
    pre, model = pretrained_and_finetuned()
    tpgm = TPGM(model, (b for b in val_batches()), anchors=pre)
    with pytest.raises(FineregError, match=r"ran out after 2 batch\(es\).*one-shot.*re-iterable"):
        tpgm.fit(3)
