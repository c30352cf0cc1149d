"""The grid operators (flowverify.transport.grid): A, Aᵀ and the incidence matrix, in numpy
and torch, and the numba kernels that inline them, compared to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowverify.transport import mincostflow, simplex_kernels
from flowverify.transport.grid import (
    adjoint,
    divergence,
    flow_dim,
    incidence_matrix,
    join_flow,
    split_flow,
)
from flowverify.transport.pgd_step import compiled_available, pgd_step_images

SHAPES = [(1, 1), (1, 5), (4, 1), (2, 3), (5, 4), (7, 7)]


def _data(h, w, seed=0, lead=(3, 2)):
    rng = np.random.default_rng(seed)
    flow = rng.standard_normal((*lead, flow_dim(h, w)))
    q = rng.standard_normal((*lead, h, w))
    return flow, q


# ----------------------------------------------------------------------- A and Aᵀ


@pytest.mark.parametrize("h,w", SHAPES)
def test_divergence_is_the_incidence_matrix(h, w):
    flow, _ = _data(h, w)
    a = incidence_matrix(h, w)
    expected = np.einsum("pd,ncd->ncp", a.toarray(), flow).reshape(3, 2, h, w)
    np.testing.assert_allclose(divergence(flow, h, w), expected, rtol=0, atol=1e-12)
    out_t = divergence(torch.as_tensor(flow), h, w)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (3, 2, h, w)
    np.testing.assert_array_equal(out_t.numpy(), divergence(flow, h, w))  # same bits


@pytest.mark.parametrize("h,w", SHAPES)
def test_adjoint_is_the_transposed_incidence_matrix(h, w):
    _, q = _data(h, w, seed=1)
    a = incidence_matrix(h, w)
    expected = np.einsum("pd,ncp->ncd", a.toarray(), q.reshape(3, 2, h * w))
    np.testing.assert_allclose(adjoint(q), expected, rtol=0, atol=1e-12)
    out_t = adjoint(torch.as_tensor(q))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (3, 2, flow_dim(h, w))
    np.testing.assert_array_equal(out_t.numpy(), adjoint(q))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_adjoint_identity(seed, kind):
    """⟨Aδ, q⟩ = ⟨δ, Aᵀq⟩ for random flows and pixel maps of random shapes."""
    rng = np.random.default_rng(100 + seed)
    h, w = (int(s) for s in rng.integers(1, 12, size=2))
    flow, q = _data(h, w, seed=seed, lead=(2, 3))
    if kind == "torch":
        flow, q = torch.as_tensor(flow), torch.as_tensor(q)
    lhs = float((divergence(flow, h, w) * q).sum())
    rhs = float((flow * adjoint(q)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_mass_is_conserved_and_constants_have_no_gradient():
    flow, _ = _data(6, 5)
    np.testing.assert_allclose(divergence(flow, 6, 5).sum(axis=(-2, -1)), 0.0, atol=1e-12)
    np.testing.assert_array_equal(adjoint(np.full((2, 6, 5), 3.5)), 0.0)


def test_torch_divergence_gradient_is_the_adjoint():
    h, w = 4, 6
    flow, q = _data(h, w, seed=3)
    ft = torch.as_tensor(flow).requires_grad_(True)
    (divergence(ft, h, w) * torch.as_tensor(q)).sum().backward()
    np.testing.assert_allclose(ft.grad.numpy(), adjoint(q), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_split_and_join_are_inverse(kind):
    flow, _ = _data(3, 4, seed=4)
    if kind == "torch":
        flow = torch.as_tensor(flow)
    h, v = split_flow(flow, 3, 4)
    assert tuple(h.shape) == (3, 2, 3, 3) and tuple(v.shape) == (3, 2, 2, 4)
    back = join_flow(h, v)
    assert type(back) is type(flow)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(flow))


# ------------------------------------------------- kernels that inline the operators


@pytest.mark.parametrize("h,w", SHAPES)
def test_min_cost_flow_tables_mirror_the_incidence_matrix(h, w):
    """Edge ``e`` of the simplex's grid graph runs from the -1 row of column ``e`` of A to
    its +1 row."""
    n, d = h * w, flow_dim(h, w)
    ea, eb, *_ = mincostflow._unpack_tables(mincostflow._grid_tables(h, w), n, d)
    a = incidence_matrix(h, w).toarray()
    expected = np.zeros((n, d))
    expected[ea, np.arange(d)] = -1.0
    expected[eb, np.arange(d)] = 1.0
    np.testing.assert_array_equal(expected, a)


@pytest.mark.parametrize("h,w", SHAPES)
def test_simplex_pricing_mirrors_the_adjoint(h, w):
    """The pricing kernels find the largest reduced cost ``|(Aᵀ pi)_e|`` and its edge."""
    n, d = h * w, flow_dim(h, w)
    _, _, hm, vm, hidx, _, _ = mincostflow._unpack_tables(mincostflow._grid_tables(h, w), n, d)
    rng = np.random.default_rng(h * 10 + w)
    pi = np.zeros(n + w + 1, np.int32)
    pi[:n] = rng.integers(-9, 10, size=n)
    reduced = np.abs(adjoint(pi[:n].reshape(h, w).astype(np.float64)))
    mx = simplex_kernels._block_max(pi, hm, vm, 0, n, w)
    assert mx == (reduced.max() if d else 0)
    if d and mx > 0:
        e = simplex_kernels._block_argmax(pi, hm, vm, hidx, h * (w - 1), 0, n, w, mx)
        assert reduced[e] == mx


@pytest.mark.skipif(not compiled_available(), reason="numba unavailable")
def test_compiled_step_mirrors_divergence_and_adjoint():
    """The attack's compiled step inlines A (its new image) and Aᵀ (its direction)."""
    n, c, h, w = 3, 2, 5, 6
    rng = np.random.default_rng(7)
    mu = torch.as_tensor(10.0 + rng.random((n, c, h, w)))
    big = torch.full((n,), 1e9, dtype=torch.float64)
    # A: with a zero gradient the flow is kept and the image is mu + A w
    wflow = torch.as_tensor(rng.standard_normal((n, c, flow_dim(h, w))))
    x = mu + divergence(wflow, h, w)
    zero = torch.zeros_like(mu)
    out, xout = pgd_step_images(wflow, x, zero, mu, big, torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(out, wflow, rtol=0, atol=0)
    torch.testing.assert_close(xout, mu + divergence(wflow, h, w), rtol=0, atol=1e-13)
    # Aᵀ: from w = 0 with room everywhere, the step is -alpha Aᵀg / ||Aᵀg||_2
    g = torch.as_tensor(rng.standard_normal((n, c, h, w)))
    alpha = torch.full((n,), 1e-3, dtype=torch.float64)
    out, _ = pgd_step_images(torch.zeros_like(wflow), mu, g, mu, big, alpha)
    grad = adjoint(g)
    norm = grad.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(out * norm / alpha[:, None, None], -grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w", SHAPES)
def test_verification_kernels_mirror_the_adjoint(h, w):
    """``‖Aᵀg‖_∞`` in the verification kernels (numba and torch) against the adjoint."""
    from flowverify.verification.ball import _acc_lip, _grad_absmax_t
    from flowverify.verification.polytope_transform import _lip_support

    c = 3
    rng = np.random.default_rng(h * 7 + w)
    g = rng.standard_normal((c, h, w))
    per_channel = np.abs(adjoint(g)).max(axis=-1, initial=0.0)
    assert _lip_support(g.ravel(), c, h, w)[0] == per_channel.max()
    scale = rng.random(c) + 0.5
    assert _acc_lip(g.ravel(), scale, c, h, w) == (per_channel * scale).max()
    q = torch.as_tensor(rng.standard_normal((4, c * h * w)))
    diffs = adjoint(q.reshape(4, c, h, w)).abs()
    expected = diffs.amax(dim=-1) if diffs.shape[-1] else torch.zeros(4, c, dtype=q.dtype)
    got = _grad_absmax_t(q, (c, h, w), per_channel=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(_grad_absmax_t(q, (c, h, w)), expected.amax(-1), rtol=0, atol=0)
