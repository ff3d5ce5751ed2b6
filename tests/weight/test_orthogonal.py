"""Orthogonality penalties: Keras golden values, the formulas written out naively, smaller-side Grams,
SRIP's power iteration against the exact spectral norm and the authors' procedure, batching over groups."""

import io

import pytest
import torch
from torch import nn

from finereg.reparam.freeze import freeze
from finereg.weight.groups import WeightGroup
from finereg.weight.orthogonal import (
    SRIP,
    CallablePenalty,
    DoubleSoftOrthogonality,
    MutualCoherence,
    Orthogonality,
    SoftOrthogonality,
    create_penalty,
)

D = torch.float64
SHAPES = [(5, 9), (9, 5), (6, 6), (1, 4), (12, 3)]  # wide, tall, square, one row, very tall


def eye(k):
    return torch.eye(k, dtype=D)


# naive references, straight from the formulas (n × n Gram always)
def naive_so(w):
    return (w @ w.T - eye(w.shape[0])).square().sum()


def naive_dso(w):
    return naive_so(w) + (w.T @ w - eye(w.shape[1])).square().sum()


def naive_cos(w):
    u = w / w.norm(dim=1, keepdim=True)
    return u @ u.T


def naive_keras(w):
    n = w.shape[0]
    if n == 1:
        return w.sum() * 0
    off = naive_cos(w) * (1 - eye(n))
    return 0.5 * off.abs().sum() / (n * (n - 1) / 2)


def naive_mc(w):
    n = w.shape[0]
    return (naive_cos(w) - eye(n)).abs().max() if n > 1 else w.sum() * 0


def naive_srip_exact(w):  # spectral norm of the smaller-side Gram minus I
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.matrix_norm(g - eye(g.shape[0]), ord=2)


def value_and_grad(fn, w):
    w = w.detach().clone().requires_grad_(True)
    v = fn(w)
    (g,) = torch.autograd.grad(v, w)
    return v.detach(), g


def test_keras_golden(keras_golden):
    cases = keras_golden["orthogonal"]
    assert len(cases) == 16
    for c in cases:
        got = Orthogonality(factor=c["factor"], mode=c["mode"])(c["matrix"])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, c["value"], rtol=1e-5, atol=0)
        # the same number from a float64 computation
        torch.testing.assert_close(
            Orthogonality(factor=c["factor"], mode=c["mode"])(c["matrix"].double()),
            c["value"].double(),
            rtol=1e-5,
            atol=0,
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "penalty, naive",
    [
        (SoftOrthogonality(), naive_so),
        (DoubleSoftOrthogonality(), naive_dso),
        (Orthogonality(), naive_keras),
        (Orthogonality(mode="columns"), lambda w: naive_keras(w.T)),
        (MutualCoherence(), naive_mc),
        (MutualCoherence(mode="columns"), lambda w: naive_mc(w.T)),
    ],
    ids=["so", "dso", "keras_rows", "keras_cols", "mc_rows", "mc_cols"],
)
def test_values_and_gradients_equal_the_naive_formula(penalty, naive, shape):
    w = torch.randn(shape, dtype=D)
    v, g = value_and_grad(penalty, w)
    v0, g0 = value_and_grad(naive, w)
    torch.testing.assert_close(v, v0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-12)


def test_tall_soft_orthogonality_uses_the_small_gram():
    """For n > m the value is ‖WᵀW − I_m‖² + (n − m): prove the identity and that no n × n product is formed."""
    w = torch.randn(40, 3, dtype=D)
    torch.testing.assert_close(SoftOrthogonality()(w), (w.T @ w - eye(3)).square().sum() + 37)
    shapes = []
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Spy():
        SoftOrthogonality()(w)
        DoubleSoftOrthogonality()(w)
        SRIP()(w)
    assert shapes and not any(s[-2:] == (40, 40) for s in shapes if len(s) >= 2)


def test_factor_scales_and_penalties_compose():
    w = torch.randn(4, 7, dtype=D, requires_grad=True)
    total = SoftOrthogonality(factor=0.5)(w) + Orthogonality(factor=3.0)(w)
    torch.testing.assert_close(total, 0.5 * naive_so(w) + 3.0 * naive_keras(w))
    total.backward()
    assert w.grad.abs().sum() > 0


# -- groups, batching ----------------------------------------------------------------------------------------
def stage_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.Conv2d(8, 8, 3),
        nn.Conv2d(8, 8, 3),
        nn.Conv2d(8, 4, 1),
        nn.Linear(8, 8),
        nn.ConvTranspose2d(8, 6, 2, groups=2),
    ).double()


@pytest.mark.parametrize("cls", [SoftOrthogonality, DoubleSoftOrthogonality, Orthogonality, MutualCoherence])
def test_groups_batched_equal_a_per_layer_loop(cls):
    m = stage_model()
    groups = [WeightGroup(["0", "1", "2"], m, axis=None), WeightGroup(["3", "4", "5"], m, axis=None)]
    pen = cls(groups, factor=0.7)
    total = pen()
    mats = [mod.weight.reshape(mod.weight.shape[0], -1) for mod in list(m)[:5]]
    ct = m[5]
    mats.append(
        torch.cat(
            [ct.weight[0:4, j].reshape(-1)[None] for j in range(3)]
            + [ct.weight[4:8, j].reshape(-1)[None] for j in range(3)]
        )
    )
    ref = cls()
    per_layer = [ref(w) for w in mats]
    torch.testing.assert_close(total, 0.7 * sum(per_layer), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pen.values(), torch.stack(per_layer), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(total, [mod.weight for mod in m])
    ref_grads = torch.autograd.grad(0.7 * sum(per_layer), [mod.weight for mod in m])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_joined_group_is_one_matrix():
    parts = [nn.Linear(5, 2).double(), nn.Linear(5, 3).double()]
    g = WeightGroup(parts)
    w = torch.cat([p.weight for p in parts])
    torch.testing.assert_close(SoftOrthogonality(g)(), naive_so(w))
    torch.testing.assert_close(SoftOrthogonality()(g), naive_so(w))  # group given at call time
    torch.testing.assert_close(
        Orthogonality([g, WeightGroup(parts[0])])(), naive_keras(w) + naive_keras(parts[0].weight)
    )


# -- SRIP --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
def test_srip_converges_to_the_spectral_norm_and_its_gradient(shape):
    w = torch.randn(shape, dtype=D) / 3
    srip = SRIP(n_power_iterations=1)
    for _ in range(300):  # persistent vector: one step per call
        srip(w)
    v, g = value_and_grad(srip, w)
    v0, g0 = value_and_grad(naive_srip_exact, w)
    torch.testing.assert_close(v, v0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-8)
    sq = SRIP(squared=True)
    sq.load_state_dict(srip.state_dict())
    torch.testing.assert_close(sq(w), v0**2, rtol=1e-8, atol=1e-10)


def test_srip_equals_the_authors_procedure():
    """Authors' code: v1 = A b, v2 = v1/‖v1‖, v3 = A v2, value ‖v3‖² with A = (smaller-side Gram) − I."""
    for shape in [(5, 12), (12, 5)]:
        w = torch.randn(shape, dtype=D)
        k = min(shape)
        b = torch.rand(k, dtype=D)
        g = w @ w.T if shape[0] <= shape[1] else w.T @ w
        a = g - eye(k)
        v1 = a @ b
        v3 = a @ (v1 / v1.norm())
        srip = SRIP(squared=True, n_power_iterations=1)
        srip(w)  # creates the persistent vector, then start it from the authors' b
        getattr(srip, "u_c1_{}x{}".format(*shape)).copy_(b[None])
        torch.testing.assert_close(srip(w), v3.norm() ** 2, rtol=1e-12, atol=1e-12)


def test_srip_vector_persists_in_training_only_and_in_state_dict():
    m = stage_model()
    grp = WeightGroup(["1", "2"], m, axis=None)  # two 8 × 72 matrices: one bucket of 2
    srip = SRIP(grp, n_power_iterations=2)
    srip()
    ((name, vec),) = srip.named_buffers()
    assert vec.shape == (2, 8)
    before = vec.clone()
    srip()
    assert not torch.equal(vec, before)  # moved in training
    srip.eval()
    before = vec.clone()
    v_eval = srip()
    assert torch.equal(vec, before)  # no update in eval
    buf = io.BytesIO()
    torch.save(srip.state_dict(), buf)
    fresh = SRIP(grp, n_power_iterations=2).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh(), v_eval)


# -- callables, factory, errors ------------------------------------------------------------------------------
def test_callable_penalty_seed_function():
    parts = [nn.Conv2d(16, 1, 1, bias=False).double() for _ in range(4)]
    keras_kernel = torch.cat([p.weight.permute(2, 3, 1, 0) for p in parts], -1)  # (1, 1, 16, 4)
    seed_value = (keras_kernel * keras_kernel.flip(-1)).sum()  # the seed's reduce_sum(K * K[..., ::-1])
    pen = CallablePenalty(lambda w: (w * w.flip(0)).sum(), WeightGroup(parts), factor=2.0)
    torch.testing.assert_close(pen(), 2 * seed_value)
    pen().backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in parts)
    with pytest.raises(TypeError, match="scalar tensor"):
        CallablePenalty(lambda w: w, WeightGroup(parts))()
    with pytest.raises(TypeError, match="callable"):
        CallablePenalty(3)


def test_create_penalty_and_errors():
    w = torch.randn(3, 5, dtype=D)
    assert isinstance(create_penalty("srip", factor=0.1, squared=True), SRIP)
    assert isinstance(create_penalty(lambda m: m.sum()), CallablePenalty)
    torch.testing.assert_close(create_penalty("soft_orthogonal", factor=2.0)(w), 2 * naive_so(w))
    with pytest.raises(ValueError, match="did you mean 'srip'"):
        create_penalty("sirp")
    with pytest.raises(ValueError, match="factor must be a finite number >= 0"):
        SoftOrthogonality(factor=-1.0)
    with pytest.raises(ValueError, match="mode"):
        Orthogonality(mode="filters")
    with pytest.raises(ValueError, match="2-D matrix"):
        SoftOrthogonality()(torch.randn(4, 3, 1, 1))
    with pytest.raises(ValueError, match="no groups"):
        SoftOrthogonality()()
    with pytest.raises(ValueError, match="n_power_iterations"):
        SRIP(n_power_iterations=-1)
    with pytest.raises(TypeError, match="WeightGroup"):
        SoftOrthogonality([3])


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
@pytest.mark.parametrize(
    "penalty, naive", [(SoftOrthogonality(), naive_so), (DoubleSoftOrthogonality(), naive_dso)], ids=["so", "dso"]
)
def test_analytic_gradient_supports_double_backward(penalty, naive, shape):
    """SO / DSO use a hand-written gradient (one matmul); under create_graph it stays exact: Hessian-vector
    products equal autograd's on the naive formula."""
    w = torch.randn(shape, dtype=D, requires_grad=True)
    v = torch.randn(shape, dtype=D)
    hvp = []
    for fn in (penalty, naive):
        (g,) = torch.autograd.grad(fn(w), w, create_graph=True)
        hvp.append(torch.autograd.grad((g * v).sum(), w)[0])
    torch.testing.assert_close(hvp[0], hvp[1], rtol=1e-10, atol=1e-12)


def test_soft_orthogonality_pushes_trainable_filters_away_from_frozen_ones(one_thread):
    D = torch.float64
    conv = nn.Conv2d(1024, 10, 1, bias=False).double()
    with torch.no_grad():  # three frozen orthonormal filters
        q, _ = torch.linalg.qr(torch.randn(1024, 3, dtype=D))
        conv.weight[:3] = q.T.reshape(3, 1024, 1, 1)
    freeze(conv, "weight", [0, 1, 2])
    penalty = SoftOrthogonality(WeightGroup(conv))
    opt = torch.optim.SGD(conv.parameters(), lr=0.05, momentum=0.5)
    w = conv.weight.reshape(10, -1)
    cross0 = (w[3:] @ w[:3].T).abs().max().item()
    for _ in range(60):
        opt.zero_grad()
        penalty().backward()
        opt.step()
    w = conv.weight.reshape(10, -1)
    assert torch.equal(w[:3], q.T)
    assert (w[3:] @ w[:3].T).abs().max().item() < 1e-3 * cross0  # pushed away from the frozen filters
    torch.testing.assert_close(w @ w.T, torch.eye(10, dtype=D), atol=1e-4, rtol=0)
