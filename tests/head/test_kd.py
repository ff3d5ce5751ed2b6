"""Knowledge distillation: tllib's value (golden), the T²-scaled option, reductions, bad input."""

import pytest
import torch
import torch.nn.functional as F

from finereg._checks import FineregError
from finereg.head.co_tuning import co_tuning_loss
from finereg.head.kd import KnowledgeDistillation, kd_loss


def test_golden_value_and_grad(golden):
    assert len(golden["kd"]) >= 2 and len({c["T"] for c in golden["kd"]}) >= 2  # several temperatures covered
    for case in golden["kd"]:
        student = case["student"].clone().requires_grad_(True)
        value = KnowledgeDistillation(temperature=case["T"])(student, case["teacher"])
        value.backward()
        torch.testing.assert_close(value.detach(), case["value"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(student.grad, case["grad"], rtol=1e-6, atol=1e-8)


def test_formula_from_definition():
    """KL(p_t ‖ p_s) per sample, averaged over the batch, written out by hand."""
    s, t, T = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), 3.0
    p_t, p_s = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, T), expected)


def test_t2_scaling_is_hinton_form(golden):
    for case in golden["kd"]:
        T = case["T"]
        scaled = kd_loss(case["student"], case["teacher"], T, t2_scaling=True)
        torch.testing.assert_close(scaled, case["value"] * T * T, rtol=1e-6, atol=1e-8)
    # the point of T²: the gradient's scale stays comparable across temperatures (≈ 1/T² smaller without it)
    s = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(64, 10, dtype=torch.float64)
    g = [torch.autograd.grad(kd_loss(s, t, T, t2_scaling=on), s)[0].norm() for T in (4.0, 8.0) for on in (False, True)]
    assert g[2] / g[0] < 0.35  # unscaled: shrinks roughly 4x from T=4 to T=8
    assert 0.7 < g[3] / g[1] < 1.3  # scaled: about the same


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none", "batchmean"])
def test_reductions_match_kl_div(reduction):
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    expected = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction=reduction)
    torch.testing.assert_close(kd_loss(s, t, 2.0, reduction), expected)


def test_zero_when_student_equals_teacher():
    x = torch.randn(4, 7)
    assert float(kd_loss(x, x.clone(), 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_bad_input():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        KnowledgeDistillation(temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        KnowledgeDistillation(reduction="average")
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="must be tensors"):
        kd_loss([1.0, 2.0], torch.randn(2))


def test_an_empty_batch_is_an_error_like_bss():
    """issue 9 #11: kd_loss on an empty batch returned NaN (the mean over 0 samples) where BSS raises."""
    empty = torch.zeros(0, 5)
    with pytest.raises(FineregError, match=r"kd_loss got an empty batch \(logits of shape \(0, 5\)\)"):
        kd_loss(empty, empty)
    with pytest.raises(FineregError, match="empty batch"):
        KnowledgeDistillation()(empty, empty)
    assert kd_loss(empty, empty, reduction="sum").item() == 0.0  # a sum over no sample is 0, well defined
    with pytest.raises(FineregError, match="co_tuning_loss got an empty batch"):
        co_tuning_loss(empty, empty)
