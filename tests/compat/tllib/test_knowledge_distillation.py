"""finereg.compat.tllib.knowledge_distillation: tllib's KnowledgeDistillationLoss values and defaults."""

import torch

from finereg.compat.tllib.knowledge_distillation import KnowledgeDistillationLoss


def test_kd_golden(golden):
    for case in golden["kd"]:
        student = case["student"].clone().requires_grad_(True)
        value = KnowledgeDistillationLoss(T=case["T"])(student, case["teacher"])
        value.backward()
        torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(student.grad, case["grad"], rtol=1e-6, atol=1e-8)
    assert KnowledgeDistillationLoss().T == 1.0 and KnowledgeDistillationLoss().reduction == "batchmean"
