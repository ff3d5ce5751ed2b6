"""Batch Spectral Shrinkage (finereg.feature.bss): tllib's values and gradients, every method, precision, errors."""

from __future__ import annotations

import pytest
import torch

from finereg._checks import FineregError
from finereg.feature.bss import BSS, batch_spectral_shrinkage

METHODS = ["auto", "gram", "svdvals", "svd"]


def tllib_bss(features, k):
    """tllib's procedure, written out: torch.svd of Fᵀ, the k last (smallest) singular values squared."""
    s = torch.svd(features.t()).S
    return sum(s[s.size(0) - 1 - i] ** 2 for i in range(k))


@pytest.mark.parametrize("method", METHODS)
def test_golden_values_and_grads(golden, method):
    assert len(golden["bss"]) == 12
    shapes = set()
    for case in golden["bss"]:
        f = case["features"].clone().requires_grad_()
        value = batch_spectral_shrinkage(f, case["k"], method)
        assert value.dtype == torch.float64 and value.dim() == 0
        torch.testing.assert_close(value, case["value"], rtol=1e-6, atol=1e-8)
        value.backward()
        torch.testing.assert_close(f.grad, case["grad"], rtol=1e-6, atol=1e-8)
        shapes.add(f.shape[0] <= f.shape[1])
    assert shapes == {True, False}  # both Gram sides (b ≤ d and b > d) were exercised


def test_module_matches_function_and_repr(golden):
    case = golden["bss"][4]
    bss = BSS(k=case["k"])
    torch.testing.assert_close(bss(case["features"]), case["value"], rtol=1e-6, atol=1e-8)
    assert repr(bss) == "BSS(k=2, method='auto')"


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_gradcheck_gram(shape):
    f = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: batch_spectral_shrinkage(x, 2, "gram"), (f,))


def test_gradient_is_two_sigma_u_vt():
    f = torch.randn(10, 40, dtype=torch.float64, requires_grad=True)
    batch_spectral_shrinkage(f, 3).backward()
    u, s, vh = torch.linalg.svd(f.detach(), full_matrices=False)
    expect = sum(2 * s[-i] * torch.outer(u[:, -i], vh[-i]) for i in (1, 2, 3))
    torch.testing.assert_close(f.grad, expect, rtol=1e-9, atol=1e-12)


def realistic_features(b, d, dtype, seed=0):
    """Post-ReLU features with a dominant mean direction and a decaying spectrum (like pooled CNN features)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(32, d, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, 32, dtype=torch.float64)
    codes = torch.randn(b, 32, generator=gen, dtype=torch.float64) * scales
    return (codes @ basis + 0.5).relu().to(dtype)


@pytest.mark.parametrize("shape", [(48, 2048), (64, 32)])
def test_float32_through_float64_gram(shape):
    """float32 features: the Gram path (float64 inside) is closer to the exact value than tllib's float32 SVD."""
    f32 = realistic_features(*shape, torch.float32)
    exact = tllib_bss(f32.double(), 2)  # exact spectrum of the float32 numbers
    for method in ("auto", "svd"):
        f = f32.clone().requires_grad_()
        value = batch_spectral_shrinkage(f, 2, method)
        assert value.dtype == torch.float32
        value.backward()
        assert f.grad.dtype == torch.float32
        err = abs(value.double().item() - exact.item()) / exact.item()
        if method == "auto":
            gram_err, gram_grad = err, f.grad
            assert err < 1e-6
        else:
            svd_err = err
    assert gram_err <= svd_err + 1e-7
    fd = f32.double().requires_grad_()
    tllib_bss(fd, 2).backward()
    torch.testing.assert_close(gram_grad.double(), fd.grad, rtol=1e-4, atol=1e-5 * fd.grad.abs().max().item())


def test_rank_deficient_features():
    """A zero singular value: the value is ≥ 0 and ~0, the gradient finite and ~0, like the SVD's."""
    base = torch.randn(6, 20, dtype=torch.float64)
    f = torch.cat([base, base[:2] + base[2:4]]).requires_grad_()  # 8 rows of rank 6
    value = batch_spectral_shrinkage(f, 2)
    assert 0 <= value.item() < 1e-20
    value.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().max() < 1e-10
    value3 = batch_spectral_shrinkage(f.detach(), 3)
    torch.testing.assert_close(value3, tllib_bss(f.detach(), 3), rtol=1e-8, atol=1e-12)


def test_errors():
    f = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"k=4 must be smaller than min\(batch, dim\) = min\(8, 4\) = 4.*drop_last"):
        batch_spectral_shrinkage(f, 4)
    with pytest.raises(ValueError, match=r"k=5 must be smaller"):
        BSS(5)(f)
    with pytest.raises(ValueError, match=r"shape \(batch, dim\), got a 3-D tensor of shape \(2, 3, 4\).*flatten"):
        BSS()(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        BSS()(torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="as a tensor"):
        BSS()([[1.0, 2.0], [3.0, 4.0]])
    for k in (0, 1.5, True, "1"):
        with pytest.raises(
            ValueError, match=r"k \(how many of the smallest singular values to shrink\) must be an int"
        ):
            BSS(k)
    with pytest.raises(ValueError, match=r"unknown BSS method 'eig'; choose one of 'auto', 'gram'"):
        BSS(1, method="eig")
    with pytest.raises(ValueError, match="unknown BSS method"):
        batch_spectral_shrinkage(f, 1, "eig")


@pytest.mark.parametrize("method", ["gram", "svdvals", "svd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_named_as_such(method, bad):
    """issue 9 #20: NaN/inf features reported an eigen-solver failure instead of saying what is wrong."""
    f = torch.randn(6, 10)
    f[3, 2] = bad
    with pytest.raises(
        FineregError, match=r"BSS features are not finite: NaN or inf in the features of sample\(s\) \[3\]"
    ):
        batch_spectral_shrinkage(f, 1, method)
