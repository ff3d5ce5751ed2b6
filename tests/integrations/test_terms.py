"""The terms and Regularization on a small model: the scaling rules, state, optimizer wrapping, checked input."""

import copy

import pytest
import torch
from torch import nn

import finereg
from finereg._checks import FineregError
from finereg.integrations import (
    BSSTerm,
    DeltaTerm,
    KDTerm,
    L2SPTerm,
    Regularization,
    WrapOptimizer,
    call_model,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _moved(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("m, f, w", [(1, 1.0, 1), (4, 0.25, 1), (4, 1.0, 1), (2, 0.5, 3)])
def test_scaling_rules(m, f, w):
    """A mean term (L2-SP, KD, BSS) is returned as v / (M·f), a sum term (DELTA) as v·W / f."""
    model = Net()
    reg = Regularization(
        [L2SPTerm(0.1), DeltaTerm("body.0", 0.5), KDTerm(0.3, 2.0, output=lambda o: o), BSSTerm("body", 0.2)]
    ).attach(model)
    source = copy.deepcopy(model)
    _moved(model)
    x = torch.randn(5, 6)
    out = model(x)
    total, terms = reg.loss(x, out, accumulation=m, loss_factor=f, world_size=w)
    l2sp = finereg.L2SP(model, anchor=source, alpha=0.1)()
    delta = 0.5 * finereg.behavioral_penalty({"a": source.body[0](x)}, {"a": model.body[0](x)})
    kd = 0.3 * finereg.kd_loss(out, source(x), 2.0)
    bss = 0.2 * finereg.BSS()(model.body(x))
    torch.testing.assert_close(terms["l2sp"], l2sp / (m * f))
    torch.testing.assert_close(terms["delta"], delta * w / f)
    torch.testing.assert_close(terms["kd"], kd / (m * f))
    torch.testing.assert_close(terms["bss"], bss / (m * f))
    torch.testing.assert_close(total, sum(terms.values()))
    assert list(terms) == ["l2sp", "delta", "kd", "bss"]


def test_default_factor_is_one_over_accumulation():
    model = Net()
    reg = Regularization([L2SPTerm(1.0)]).attach(model)
    _moved(model)
    _, a = reg.loss(None, None, accumulation=4)
    _, b = reg.loss(None, None, accumulation=4, loss_factor=0.25, world_size=1)
    torch.testing.assert_close(a["l2sp"], b["l2sp"])


def test_state_dict_restores_anchors_and_source():
    """A Regularization attached to other weights gets the anchors and the source model back from the state."""
    model = Net()
    terms = lambda: [L2SPTerm(1.0), DeltaTerm("body.0")]  # noqa: E731
    reg = Regularization(terms()).attach(model)
    state = reg.state_dict()
    pretrained = copy.deepcopy(model)
    other = _moved(copy.deepcopy(model))
    reg2 = Regularization(terms()).attach(other)
    reg2.load_state_dict(state)
    for name in reg2.terms[0].penalty.anchored_names:
        torch.testing.assert_close(reg2.terms[0].penalty.anchor(name), pretrained.get_parameter(name))
    for a, b in zip(reg2.source.state_dict().values(), pretrained.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FineregError, match="resume with the same terms"):
        Regularization([L2SPTerm(1.0)]).attach(Net()).load_state_dict(state)
    with pytest.raises(FineregError, match="not a finereg Regularization state"):
        reg2.load_state_dict({"anchors": 1})


def test_source_copy_runs_without_the_models_hooks():
    """The frozen copy is made before the terms' hooks and drops the model's own: the source forward never writes
    into a capture of the model."""
    model = Net()
    user_cap = finereg.FeatureCapture(model, ["body"])
    reg = Regularization([DeltaTerm("body.0")]).attach(model)
    assert not reg.source.body._forward_hooks  # the user's capture of "body" did not come along
    assert len(reg.source._forward_pre_hooks) == 1 and len(reg.source.body[0]._forward_hooks) == 1  # DELTA's own
    assert not reg.source.training and not any(p.requires_grad for p in reg.source.parameters())
    x = torch.randn(2, 6)
    model(x)
    kept = user_cap["body"]
    reg.run_source(x)
    assert user_cap["body"] is kept
    reg.close()
    assert len(model.body[0]._forward_hooks) == 0
    user_cap.close()


def test_wrap_optimizer_excludes_what_is_not_regularized():
    """Parameters outside the regularized module and those matched by exclude are left to the inner optimizer;
    with a source model θ0 is matched by name, else it is the weights when wrapped."""
    outer = nn.ModuleDict({"net": Net(), "extra": nn.Linear(3, 3)})
    pretrained = Net()
    reg = Regularization([WrapOptimizer(finereg.SPD, weight_decay=0.5, exclude="head.*")], source=pretrained)
    reg.attach(outer["net"])
    opt = reg.wrap_optimizer(torch.optim.SGD(outer.parameters(), lr=0.1))
    assert isinstance(opt, finereg.SPD)
    anchored = {id(p) for p in opt.anchored}
    assert anchored == {id(p) for p in outer["net"].body.parameters()}
    for p, q in zip(outer["net"].body.parameters(), pretrained.body.parameters()):
        assert torch.equal(opt.state[p]["anchor"], q)
    reg = Regularization([L2SPTerm(0.5, 0.1, mode="decoupled", new_params="head.*")]).attach(Net())
    opt = reg.wrap_optimizer(torch.optim.SGD(reg.model.parameters(), lr=0.1))
    assert isinstance(opt, finereg.DecoupledL2SP) and len(opt.anchored) == 4  # body: 2 weights, 2 biases
    snapshot = copy.deepcopy(reg.model)  # θ0: the weights when wrapped
    _moved(reg.model)
    expected = finereg.L2SP(reg.model, anchor=snapshot, alpha=0.5, beta=0.1, new_params="head.*")
    assert reg.log_values()["l2sp"] == pytest.approx(float(expected.value()), rel=1e-6)


def test_fused_term_adds_the_loss_terms_gradient():
    model = Net()
    reg = Regularization([L2SPTerm(0.3, 0.2, mode="fused", new_params="head.*")]).attach(model)
    ref = finereg.L2SP(model, alpha=0.3, beta=0.2, new_params="head.*")
    _moved(model)
    reg.add_grads_()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref().backward()
    for a, p in zip(fused, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert reg.loss(None, None)[0] is None  # no loss term


def test_arguments_are_checked():
    with pytest.raises(FineregError, match="alpha must be"):
        L2SPTerm(-1.0)
    with pytest.raises(FineregError, match="mode must be one of"):
        L2SPTerm(mode="eager")
    with pytest.raises(FineregError, match="layers must be"):
        DeltaTerm([])
    with pytest.raises(FineregError, match="one module name"):
        BSSTerm(["pooler"])
    with pytest.raises(FineregError, match="temperature must be"):
        KDTerm(temperature=0)
    with pytest.raises(FineregError, match="optimizer wrapper class"):
        WrapOptimizer(torch.optim.SGD)
    with pytest.raises(FineregError, match="sets .*anchors"):
        WrapOptimizer(finereg.SPD, weight_decay=0.1, anchors="zero")
    with pytest.raises(FineregError, match="named"):
        Regularization([L2SPTerm(), L2SPTerm()])
    with pytest.raises(FineregError, match="terms is empty"):
        Regularization([])
    with pytest.raises(FineregError, match="finereg.integrations terms"):
        Regularization([finereg.L2SP(Net())])
    with pytest.raises(FineregError, match="log key"):
        L2SPTerm(name="l2 sp")
    reg = Regularization([L2SPTerm()])
    with pytest.raises(FineregError, match="not attached"):
        reg.loss(None, None)
    reg.attach(Net())
    with pytest.raises(FineregError, match="already attached"):
        reg.attach(Net())
    with pytest.raises(KeyError, match="did you mean"):
        Regularization([DeltaTerm("bdy.0")]).attach(Net())


def test_non_tensor_features_name_the_fix():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return (self.inner(x), x)

    model = nn.Sequential(TupleOut())
    reg = Regularization([DeltaTerm("0", select=None)]).attach(model)
    model(torch.randn(2, 3))
    with pytest.raises(FineregError, match="pass select="):
        reg.loss(torch.randn(2, 3), None)


def test_call_model_conventions():
    f = lambda *a, **k: (a, k)  # noqa: E731
    assert call_model(f, {"x": 1}) == ((), {"x": 1})
    assert call_model(f, (1, 2)) == ((1, 2), {})
    assert call_model(f, 3) == ((3,), {})


def test_terms_import_no_trainer():
    """``finereg.integrations`` (the terms, Regularization) needs torch only: no trainer is imported with it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; before = set(sys.modules); import finereg.integrations; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "heavy = new & {'transformers', 'accelerate', 'lightning', 'pytorch_lightning'}; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrap_optimizer_checks_the_wrappers_arguments_up_front():
    """Without weight_decay, WrapOptimizer(finereg.SPD) failed only when the trainer built its optimizer."""
    with pytest.raises(FineregError, match=r"WrapOptimizer\(SPD\) needs weight_decay=\.\.\."):
        WrapOptimizer(finereg.SPD)
    with pytest.raises(FineregError, match=r"WrapOptimizer\(DecoupledL2SP\) needs alpha="):
        WrapOptimizer(finereg.DecoupledL2SP, beta=0.1)
    with pytest.raises(FineregError, match=r"\['lr'\] that FTP does not take"):
        WrapOptimizer(finereg.FTP, lr=0.1)
    assert WrapOptimizer(finereg.FTP, k=0.5, name="ftp2").kwargs == {"k": 0.5}
