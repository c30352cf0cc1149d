"""Exact facts of the flow domain (SPEC sections 1-2): A, Δ, Δ⁻¹ and W1."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowverify as fv
from flowverify.transport.flows import apply_flow_adjoint, flow_dim

MNIST = "../shared/data/mnist10k.npz"


def _cost(h, w):
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    return (np.abs(ii[:, None] - ii[None]) + np.abs(jj[:, None] - jj[None])).astype(float)


def pot_w1(a, b):
    """Reference W1 (L1 ground cost) from POT on the full cost matrix, raw units."""
    h, w = a.shape[-2:]
    m = a.sum()
    return ot.emd2(a.ravel() / m, b.ravel() / m, _cost(h, w), numItermax=10**7) * m


@pytest.fixture(scope="module")
def digits():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"
    if not path.exists():  # pragma: no cover - the bundled sample is the fallback
        from flowverify.io.bundled import bundled_digits

        x, _ = bundled_digits()
        return x[:20, 0].astype(np.float64)
    with np.load(path) as d:
        return d["x"][-20:].astype(np.float64) / 255.0


# ------------------------------------------------------------------- incidence matrix


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (3, 4), (28, 28)])
def test_incidence_matrix_shape_and_mass_conservation(h, w):
    a = fv.incidence_matrix(h, w)
    assert a.shape == (h * w, flow_dim(h, w))
    assert a.format == "csr"
    np.testing.assert_array_equal(np.asarray(a.sum(axis=0)).ravel(), 0.0)  # 1ᵀA = 0


def test_incidence_matrix_columns_follow_spec():
    h, w = 3, 4
    a = fv.incidence_matrix(h, w).toarray()
    # column of h[1, 2]: -1 at (1, 2), +1 at (1, 3)
    col = 1 * (w - 1) + 2
    assert a[1 * w + 2, col] == -1 and a[1 * w + 3, col] == 1 and np.abs(a[:, col]).sum() == 2
    # column of v[0, 3]: -1 at (0, 3), +1 at (1, 3)
    col = h * (w - 1) + 0 * w + 3
    assert a[0 * w + 3, col] == -1 and a[1 * w + 3, col] == 1 and np.abs(a[:, col]).sum() == 2


def test_incidence_matrix_rejects_bad_sizes():
    with pytest.raises(ValueError, match="height"):
        fv.incidence_matrix(0, 3)
    with pytest.raises(TypeError, match="width"):
        fv.incidence_matrix(3, 2.5)


# ------------------------------------------------------------------------ apply_flow


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 4), (28, 28)])
def test_apply_flow_matches_sparse_matrix(h, w):
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, h, w))
    flow = rng.normal(size=(3, 2, flow_dim(h, w)))
    a = fv.incidence_matrix(h, w)
    expected = x + np.einsum("pd,ncd->ncp", a.toarray(), flow).reshape(x.shape)
    np.testing.assert_allclose(fv.apply_flow(x, flow), expected, atol=1e-12)


def test_apply_flow_composition_and_mass():
    rng = np.random.default_rng(1)
    x = rng.random((2, 1, 6, 5))
    d1, d2 = rng.normal(size=(2, 2, 1, flow_dim(6, 5)))
    once = fv.apply_flow(x, d1 + d2)
    twice = fv.apply_flow(fv.apply_flow(x, d1), d2)
    np.testing.assert_allclose(once, twice, atol=1e-12)
    np.testing.assert_allclose(once.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)), atol=1e-12)


def test_apply_flow_ranks_kinds_and_dtypes():
    rng = np.random.default_rng(2)
    x = rng.random((7, 6)).astype(np.float32)
    flow = rng.normal(size=flow_dim(7, 6)).astype(np.float32)
    out = fv.apply_flow(x, flow)
    assert out.shape == (7, 6) and out.dtype == np.float32
    xt = torch.as_tensor(x, dtype=torch.float64)
    ft = torch.as_tensor(flow, dtype=torch.float64)
    out_t = fv.apply_flow(xt, ft)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), out, atol=1e-5)
    # a batch of flows on one reference broadcasts
    flows = rng.normal(size=(4, 1, flow_dim(7, 6)))
    assert fv.apply_flow(x[None].astype(np.float64), flows).shape == (4, 1, 7, 6)


def test_apply_flow_is_differentiable_and_adjoint_is_transpose():
    h, w = 4, 5
    x = torch.rand(1, 1, h, w, dtype=torch.float64)
    flow = torch.randn(1, 1, flow_dim(h, w), dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 1, h, w, dtype=torch.float64)
    (fv.apply_flow(x, flow) * g).sum().backward()
    np.testing.assert_allclose(flow.grad.numpy(), apply_flow_adjoint(g).numpy(), atol=1e-12)
    a = fv.incidence_matrix(h, w).toarray()
    np.testing.assert_allclose(apply_flow_adjoint(g.numpy()).ravel(), a.T @ g.numpy().ravel())


def test_apply_flow_errors_name_the_argument():
    x = np.ones((5, 5))
    with pytest.raises(ValueError, match="flow: expected a last axis of length D"):
        fv.apply_flow(x, np.zeros(3))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray or torch.Tensor"):
        fv.apply_flow([[1.0]], np.zeros(0))
    with pytest.raises(TypeError, match="x, flow"):
        fv.apply_flow(torch.ones(5, 5), np.zeros(flow_dim(5, 5)))


# ---------------------------------------------------------------------- inverse_flow


@pytest.mark.parametrize("method", ["minimal", "algorithm2"])
def test_inverse_flow_roundtrip_on_digits(digits, method):
    x = digits[:6, None]
    ref = fv.make_reference("uniform", x)
    flow = fv.inverse_flow(ref, x, method=method)
    assert flow.shape == (6, 1, 1512) and flow.dtype == np.float64
    back = fv.apply_flow(ref, flow)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-9 * np.abs(x).max())


@pytest.mark.parametrize("method", ["minimal", "algorithm2"])
def test_inverse_flow_l1_norm_equals_pot_on_digits(digits, method):
    x = digits[:5, None]
    for kind in ("uniform", "random", "point"):
        ref = fv.make_reference(kind, x, seed=3)
        flow = fv.inverse_flow(ref, x, method=method)
        for n in range(len(x)):
            expected = pot_w1(ref[n, 0], x[n, 0])
            assert abs(np.abs(flow[n]).sum() - expected) <= 1e-9 * max(1.0, expected)


def test_inverse_flow_reference_broadcast_and_torch(digits):
    x = torch.as_tensor(digits[:3, None] / digits[:3].sum(axis=(1, 2))[:, None, None, None])
    ref = torch.full((1, 28, 28), 1.0 / 784, dtype=torch.float64)
    flow = fv.inverse_flow(ref, x)
    assert isinstance(flow, torch.Tensor) and flow.dtype == torch.float64
    np.testing.assert_allclose(fv.apply_flow(ref, flow).numpy(), x.numpy(), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    sparsity=st.floats(0.0, 0.9),
)
def test_minimal_flow_equals_pot_on_random_grids(h, w, seed, sparsity):
    rng = np.random.default_rng(seed)
    a = rng.random((h, w)) * (rng.random((h, w)) >= sparsity)
    b = rng.random((h, w)) * (rng.random((h, w)) >= sparsity)
    if a.sum() == 0:
        a[0, 0] = 1.0
    if b.sum() == 0:
        b[-1, -1] = 1.0
    b = b * a.sum() / b.sum()
    flow = fv.inverse_flow(a, b)
    np.testing.assert_allclose(fv.apply_flow(a, flow), b, atol=1e-12 * a.sum() + 1e-15)
    expected = pot_w1(a, b)
    assert abs(np.abs(flow).sum() - expected) <= 1e-9 * max(1.0, expected)
    assert abs(float(fv.w1_distance(a, b, unit="raw")) - expected) <= 1e-9 * max(1.0, expected)


def test_inverse_flow_errors():
    a = np.ones((4, 4))
    with pytest.raises(ValueError, match="method: unknown inverse_flow method 'greedy'.*minimal"):
        fv.inverse_flow(a, a, method="greedy")
    with pytest.raises(ValueError, match=r"reference mass 16 and image mass 32"):
        fv.inverse_flow(a, 2 * a)
    with pytest.raises(ValueError, match="image: expected non-negative"):
        fv.inverse_flow(a, -a)
    with pytest.raises(ValueError, match="image: expected finite"):
        fv.inverse_flow(a, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="reference: expected shape"):
        fv.inverse_flow(np.ones((3, 3)), a)
    with pytest.raises(ValueError, match="image: expected an image of shape"):
        fv.inverse_flow(a, np.ones(16))


# ------------------------------------------------------------------------ w1_distance


def test_w1_distance_metric_properties(digits):
    x = digits[:6, None]
    d_xy = fv.w1_distance(x[:3], x[3:])
    d_yx = fv.w1_distance(x[3:], x[:3])
    assert d_xy.shape == (3,)
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-12)
    np.testing.assert_allclose(fv.w1_distance(x, x), 0.0, atol=1e-15)
    d_xz = fv.w1_distance(x[0], x[2])
    assert d_xz <= fv.w1_distance(x[0], x[1]) + fv.w1_distance(x[1], x[2]) + 1e-12
    for n in range(3):
        a, b = x[n, 0] / x[n, 0].sum(), x[3 + n, 0] / x[3 + n, 0].sum()
        assert abs(d_xy[n] - pot_w1(a, b)) <= 1e-9


def test_w1_distance_units(digits):
    x = digits[:2, None]
    ref = fv.make_reference("uniform", x)
    raw = fv.w1_distance(ref, x, unit="raw")
    norm = fv.w1_distance(ref, x, unit="normalised")
    np.testing.assert_allclose(raw, norm * x.sum(axis=(1, 2, 3)), rtol=1e-10)
    with pytest.raises(ValueError, match="unit: expected one of normalised, raw"):
        fv.w1_distance(x, x, unit="pixels")
    with pytest.raises(ValueError, match="expected equal mass"):
        fv.w1_distance(x[0], 2 * x[0], unit="raw")
    with pytest.raises(ValueError, match="x: unit='normalised' needs positive mass"):
        fv.w1_distance(np.zeros((5, 5)), np.ones((5, 5)))
    t = fv.w1_distance(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(x))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32


def test_w1_distance_rgb_sums_channels():
    rng = np.random.default_rng(5)
    x, y = rng.random((2, 3, 5, 6))
    per_channel = [fv.w1_distance(x[c], y[c]) for c in range(3)]
    np.testing.assert_allclose(fv.w1_distance(x, y), sum(per_channel), rtol=1e-12)


def test_empty_batches():
    x = np.zeros((0, 1, 5, 5))
    assert fv.w1_distance(x, x).shape == (0,)
    assert fv.inverse_flow(x, x).shape == (0, 1, flow_dim(5, 5))
