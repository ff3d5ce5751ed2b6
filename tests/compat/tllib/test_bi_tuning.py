"""finereg.compat.tllib.bi_tuning: the golden three-step trajectory through tllib's classes and tllib's
classifier conventions."""

import torch
import torch.nn.functional as F
from torch import nn

from finereg.compat.tllib import bi_tuning


class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.out_features = 4


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
    model = bi_tuning.BiTuning(enc, bi_tuning.Classifier(Backbone(), 5, projection_dim=6), 5)
    assert (model.K, model.m, model.T) == (40, 0.999, 0.07)
    assert model.queue_h.shape == (5, 5, 40) and model.queue_z.shape == (6, 5, 40) and model.queue_ptr.shape == (5,)
    assert list(dict(model.named_buffers())) == ["queue_h", "queue_z", "queue_ptr"]
