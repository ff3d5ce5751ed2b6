"""finereg.compat.tllib.bss: BatchSpectralShrinkage gives tllib's numbers; k beyond the spectrum is an error."""

import pytest
import torch

from finereg.compat.tllib.bss import BatchSpectralShrinkage


def test_bss_golden(golden):
    for case in golden["bss"]:
        f = case["features"].clone().requires_grad_()
        value = BatchSpectralShrinkage(k=case["k"])(f)  # tllib's call: bss(feature)
        torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
        value.backward()
        torch.testing.assert_close(f.grad, case["grad"], rtol=1e-6, atol=1e-8)
    assert BatchSpectralShrinkage().k == 1  # tllib's default


def test_errors():
    with pytest.raises(ValueError, match=r"k=3 must be smaller than min\(batch, dim\)"):
        BatchSpectralShrinkage(k=3)(torch.randn(3, 10))
    with pytest.raises(ValueError, match="shape \\(batch, dim\\)"):
        BatchSpectralShrinkage()(torch.randn(10))
