"""finereg.lr_policy: one function decides the optimizer groups from the parts a model declares; tllib's
``get_parameters`` layouts (kept here as data, read from tllib's source) are what the classifiers declare."""

import pytest
import torch
from torch import nn

from finereg._checks import FineregError
from finereg.compat.tllib import bi_tuning as tllib_bi_tuning
from finereg.compat.tllib import co_tuning as tllib_co_tuning
from finereg.compat.tllib import lwf as tllib_lwf
from finereg.head.bi_tuning import BiTuning, BiTuningClassifier
from finereg.head.lwf import LwFClassifier
from finereg.lr_policy import param_groups

# tllib's get_parameters(base_lr) with finetune=True, group by group: (module attribute, lr / base_lr).
# tllib/modules/classifier.py, tllib/regularization/lwf.py, co_tuning.py, bi_tuning.py
TLLIB_LAYOUTS = {
    "lwf": [("backbone", 0.1), ("bottleneck", 1.0), ("head_target", 1.0)],
    "co_tuning": [("backbone", 0.1), ("head_source", 0.1), ("bottleneck", 1.0), ("head_target", 1.0)],
    "bi_tuning": [("backbone", 0.1), ("bottleneck", 1.0), ("head", 1.0), ("projector", 0.1)],
}


class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.out_features = 4


def _bottled_lwf(cls, **kw):
    return cls(Backbone(), 3, nn.Linear(4, 10), bottleneck=nn.Linear(4, 4), bottleneck_dim=4, **kw)


@pytest.mark.parametrize("method", ["lwf", "co_tuning"])
def test_compat_get_parameters_is_tllibs_layout(method):
    cls = {"lwf": tllib_lwf.Classifier, "co_tuning": tllib_co_tuning.Classifier}[method]
    model = _bottled_lwf(cls)
    groups = model.get_parameters(base_lr=0.5)
    assert [set(g) for g in groups] == [{"params", "lr"}] * len(groups)  # tllib's dict keys
    for g, (attr, mult) in zip(groups, TLLIB_LAYOUTS[method]):
        assert [id(p) for p in g["params"]] == [id(p) for p in getattr(model, attr).parameters()]
        assert g["lr"] == (0.1 * 0.5 if mult == 0.1 else 1.0 * 0.5)  # tllib's arithmetic, bit for bit
    assert len(groups) == len(TLLIB_LAYOUTS[method])
    assert [g["lr"] for g in _bottled_lwf(cls, finetune=False).get_parameters(0.5)] == [0.5] * len(groups)


def test_compat_bi_tuning_get_parameters_is_tllibs_layout():
    model = tllib_bi_tuning.Classifier(Backbone(), 5, projection_dim=6)
    groups = model.get_parameters(base_lr=0.5)
    assert [(attr, g["lr"]) for (attr, _), g in zip(TLLIB_LAYOUTS["bi_tuning"], groups)] == [
        ("backbone", 0.1 * 0.5),
        ("bottleneck", 0.5),
        ("head", 0.5),
        ("projector", 0.1 * 0.5),
    ]
    for g, (attr, _) in zip(groups, TLLIB_LAYOUTS["bi_tuning"]):
        assert [id(p) for p in g["params"]] == [id(p) for p in getattr(model, attr).parameters()]


def test_native_defaults_are_tllibs_layouts():
    lwf = LwFClassifier(Backbone(), nn.Linear(4, 10), 3, bottleneck=nn.Identity())
    assert [(g["name"], g["lr"] / 0.5) for g in lwf.param_groups(0.5)] == TLLIB_LAYOUTS["lwf"]
    co = [(g["name"], g["lr"] / 0.5) for g in lwf.param_groups(0.5, source_head="pretrained")]
    assert co == TLLIB_LAYOUTS["co_tuning"]
    enc = BiTuningClassifier(Backbone(), 5, 6, features_dim=4)
    assert [(g["name"], g["lr"] / 0.5) for g in enc.param_groups(0.5)] == TLLIB_LAYOUTS["bi_tuning"]
    bt = BiTuning(enc, K=2)
    groups = bt.param_groups(0.5)
    assert [(g["name"], g["lr"] / 0.5) for g in groups] == [
        (f"encoder_q.{n}", m) for n, m in TLLIB_LAYOUTS["bi_tuning"]
    ]
    assert not {id(p) for g in groups for p in g["params"]} & {id(p) for p in bt.encoder_k.parameters()}
    # the documented options
    assert [g["lr"] / 0.5 for g in enc.param_groups(0.5, projector="new")][-1] == 1.0


def test_param_groups_explicit_parts_and_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups(model, 1.0, {"0": "pretrained", "1": "excluded", "2": "new"}, pretrained_lr_mult=0.25)
    assert [(g["name"], g["lr"]) for g in groups] == [("0", 0.25), ("2", 1.0)]
    torch.optim.SGD(groups)
    with pytest.raises(FineregError, match=r"parameters in no declared part: 2\.weight, 2\.bias"):
        param_groups(model, 1.0, {"0": "new", "1": "new"})
    with pytest.raises(FineregError, match=r"a parameter of part '0\.0' is also in part '0'"):
        param_groups(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), 1.0, {"0": "new", "0.0": "new"})
    with pytest.raises(FineregError, match="the role of part '0' must be one of 'pretrained', 'new', 'excluded'"):
        param_groups(model, 1.0, {"0": "slow"})
    with pytest.raises(FineregError, match="Sequential declares no parts"):
        param_groups(model, 1.0)
    with pytest.raises(KeyError, match="no submodule named '3'"):
        param_groups(model, 1.0, {"3": "new"})
    with pytest.raises(FineregError, match="pretrained_lr_mult must be a finite number >= 0"):
        param_groups(model, 1.0, {"": "new"}, pretrained_lr_mult=-1)
