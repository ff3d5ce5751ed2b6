"""finereg.compat.tllib head names: tllib's signatures and the golden values (kd, co_tuning_loss,
relationship_direct, bi_tuning), the submodules mirroring tllib's, get_parameters conventions."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg.compat import tllib
from finereg.compat.tllib import (
    BiTuning,
    BiTuningClassifier,
    CoTuningClassifier,
    CoTuningLoss,
    KnowledgeDistillationLoss,
    LwFClassifier,
    Relationship,
    bi_tuning,
    co_tuning,
    lwf,
)


def test_submodules_and_exports():
    assert lwf.Classifier is LwFClassifier and co_tuning.Classifier is CoTuningClassifier
    assert bi_tuning.Classifier is BiTuningClassifier and bi_tuning.BiTuning is BiTuning
    assert co_tuning.Relationship is Relationship and co_tuning.CoTuningLoss is CoTuningLoss
    assert tllib.knowledge_distillation.KnowledgeDistillationLoss is KnowledgeDistillationLoss
    for name in ("KnowledgeDistillationLoss", "LwFClassifier", "BiTuningClassifier", "bi_tuning", "lwf", "co_tuning"):
        assert name in tllib.__all__


def test_kd_golden(golden):
    for case in golden["kd"]:
        student = case["student"].clone().requires_grad_(True)
        value = KnowledgeDistillationLoss(T=case["T"])(student, case["teacher"])
        value.backward()
        torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(student.grad, case["grad"], rtol=1e-6, atol=1e-8)
    assert KnowledgeDistillationLoss().T == 1.0 and KnowledgeDistillationLoss().reduction == "batchmean"


def test_co_tuning_loss_golden(golden):
    case = golden["co_tuning_loss"]
    x = case["input"].clone().requires_grad_(True)
    value = co_tuning.CoTuningLoss()(x, case["target"])
    value.backward()
    torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, case["grad"], rtol=1e-6, atol=1e-8)


def _golden_loader(case, batch_size=7):
    """Inputs are log-probabilities and the classifier is the identity, so softmax(classifier(x)) is the golden
    source_probabilities."""
    x = case["source_probabilities"].log()
    return DataLoader(TensorDataset(x, case["target_labels"]), batch_size=batch_size)


def test_relationship_golden_and_cache(golden, tmp_path):
    case = golden["relationship_direct"]
    rel = co_tuning.Relationship(_golden_loader(case), nn.Identity(), "cpu")
    assert isinstance(rel.relationship, np.ndarray) and rel.relationship.shape == (4, 7)
    np.testing.assert_allclose(rel.relationship, case["relationship"].numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(rel[2], case["relationship"][2].numpy(), rtol=1e-6, atol=1e-8)
    labels = torch.tensor([3, 0, 3])
    np.testing.assert_allclose(rel[labels], case["relationship"][labels].numpy(), rtol=1e-6, atol=1e-8)
    # tllib's own entry point on arrays
    direct = rel.get_category_relationship(case["source_probabilities"].numpy(), case["target_labels"].numpy())
    np.testing.assert_allclose(direct, case["relationship"].numpy(), rtol=1e-6, atol=1e-8)

    cache = tmp_path / "relationship"  # no .npy suffix: tllib would have written relationship.npy
    first = Relationship(_golden_loader(case), nn.Identity(), "cpu", cache=str(cache))
    assert cache.is_file() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been used")

    second = Relationship(_golden_loader(case), Boom(), "cpu", cache=str(cache))
    np.testing.assert_array_equal(second.relationship, first.relationship)


def test_relationship_rejects_class_without_samples():
    x = torch.randn(4, 3)
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 2, 2, 0])), batch_size=2)
    with pytest.raises(ValueError, match=r"target class\(es\) \[1\] have no sample"):
        Relationship(loader, nn.Identity(), "cpu")


class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.out_features = 4


def test_lwf_classifier_tllib_signature():
    head_source = nn.Linear(4, 10)
    model = lwf.Classifier(Backbone(), 3, head_source)
    x = torch.randn(2, 3, 8, 8)
    y_s, y_t = model(x)
    f = model.backbone(x).mean((2, 3))  # the default pool: global average + flatten
    torch.testing.assert_close(y_s, head_source(f))
    assert y_t.shape == (2, 3) and model.features_dim == 4
    model.eval()
    assert model(x).shape == (2, 3)
    groups = model.get_parameters(base_lr=0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(0.01), 0.1, 0.1]
    params = {id(p) for g in groups for p in g["params"]}
    assert not params & {id(p) for p in head_source.parameters()}  # tllib leaves the source head out
    assert [g["lr"] for g in lwf.Classifier(Backbone(), 3, nn.Linear(4, 10), finetune=False).get_parameters()] == [
        1.0
    ] * 3
    bottled = lwf.Classifier(Backbone(), 3, nn.Linear(4, 10), bottleneck=nn.Linear(4, 6), bottleneck_dim=6)
    assert bottled.head_target.in_features == 6 and bottled(x)[1].shape == (2, 3)
    keys = set(lwf.Classifier(Backbone(), 3, nn.Linear(4, 10)).state_dict())
    assert {"backbone.0.weight", "head_source.weight", "head_target.weight", "head_target.bias"} <= keys
    with pytest.raises(ValueError, match="bottleneck_dim > 0"):
        lwf.Classifier(Backbone(), 3, nn.Linear(4, 10), bottleneck=nn.Linear(4, 6))


def test_collect_pretrain_labels_in_order():
    model = nn.Linear(3, 5)
    x = torch.randn(9, 3)
    out = lwf.collect_pretrain_labels(DataLoader(TensorDataset(x, torch.zeros(9)), batch_size=4), model, "cpu")
    torch.testing.assert_close(out, model(x).detach())


def test_co_tuning_classifier_trains_source_head():
    head_source = nn.Linear(4, 10)
    groups = co_tuning.Classifier(Backbone(), 3, head_source).get_parameters(base_lr=1.0)
    assert [g["lr"] for g in groups] == [pytest.approx(0.1), pytest.approx(0.1), 1.0, 1.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head_source.parameters()}


def _golden_encoder(case):
    backbone = nn.Sequential(nn.Linear(12, case["features_dim"]), nn.ReLU())
    backbone.out_features = case["features_dim"]
    enc = bi_tuning.Classifier(
        backbone, case["num_classes"], projection_dim=case["projection_dim"], pool_layer=nn.Identity()
    ).double()
    return enc


def test_bi_tuning_golden(golden):
    case = golden["bi_tuning"]
    enc_q, enc_k = _golden_encoder(case), _golden_encoder(case)
    enc_q.load_state_dict(case["init"]["encoder_q"])
    model = bi_tuning.BiTuning(enc_q, enc_k, case["num_classes"], K=case["K"], m=case["m"], T=case["T"]).double()
    model.queue_h.copy_(case["init"]["queue_h"])
    model.queue_z.copy_(case["init"]["queue_z"])
    opt = torch.optim.SGD(enc_q.parameters(), lr=0.1)
    for step in case["steps"]:
        y_q, logits_z, logits_y, labels_c = model(step["im_q"], step["im_k"], step["labels"])
        loss = F.cross_entropy(y_q, step["labels"]) + 0.1 * (
            F.kl_div(logits_z, labels_c, reduction="batchmean") + F.kl_div(logits_y, labels_c, reduction="batchmean")
        )
        for ours, key in [
            (y_q, "y_q"),
            (logits_z, "logits_z"),
            (logits_y, "logits_y"),
            (labels_c, "labels_c"),
            (loss, "loss"),
        ]:
            torch.testing.assert_close(ours.detach(), step[key], rtol=1e-6, atol=1e-8, msg=key)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(model.queue_h, step["queue_h_after"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(model.queue_z, step["queue_z_after"], rtol=1e-6, atol=1e-8)
        assert torch.equal(model.queue_ptr, step["queue_ptr_after"])
        for enc, key in [(enc_q, "encoder_q_after"), (enc_k, "encoder_k_after")]:
            for name, p in enc.named_parameters():
                torch.testing.assert_close(p.detach(), step[key][name], rtol=1e-6, atol=1e-8)


def test_bi_tuning_classifier_tllib_conventions():
    enc = bi_tuning.Classifier(Backbone(), 5, projection_dim=6)
    assert enc.features_dim == 4 and enc.projection_dim == 6
    assert (
        float(enc.head.bias.detach().abs().max()) == 0.0 and float(enc.head.weight.detach().std()) < 0.05
    )  # N(0, 0.01²) init
    y, z, hn = enc(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 5) and z.shape == (2, 6) and hn.shape == (2, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(hn.norm(dim=1), torch.ones(2))
    groups = enc.get_parameters(base_lr=1.0)
    assert [g["lr"] for g in groups] == [pytest.approx(0.1), 1.0, 1.0, pytest.approx(0.1)]
    model = bi_tuning.BiTuning(enc, bi_tuning.Classifier(Backbone(), 5, projection_dim=6), 5)
    assert (model.K, model.m, model.T) == (40, 0.999, 0.07)
    assert model.queue_h.shape == (5, 5, 40) and model.queue_z.shape == (6, 5, 40) and model.queue_ptr.shape == (5,)
    assert list(dict(model.named_buffers())) == ["queue_h", "queue_z", "queue_ptr"]
