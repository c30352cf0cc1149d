"""Exactness of the grid min-cost-flow solver (``flowverify.transport.mincostflow``) against POT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ot
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowverify.transport import simplex_kernels
from flowverify.transport.grid import divergence
from flowverify.transport.mincostflow import grid_min_cost_flow, grid_w1

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


def _cost(h, w):
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    return (np.abs(ii[:, None] - ii[None]) + np.abs(jj[:, None] - jj[None])).astype(float)


def pot_w1(x, y):
    """W1 with L1 ground cost from POT on the full cost matrix, in the units of ``x``."""
    h, w = x.shape
    m = x.sum()
    if m == 0:
        return 0.0
    return ot.emd2(x.ravel() / m, y.ravel() / y.sum(), _cost(h, w), numItermax=10**7) * m


def check(supply, tol=1e-9):
    """Solve, verify the flow constraint, the cost identity and return the costs."""
    supply = np.asarray(supply, dtype=float)
    b, h, w = supply.shape
    flows, costs = grid_min_cost_flow(supply)
    assert flows.shape == (b, h * (w - 1) + (h - 1) * w)
    assert costs.shape == (b,)
    for k in range(b):
        scale = max(np.abs(supply[k]).sum(), 1e-300)
        resid = np.abs(divergence(flows[k], h, w) - supply[k]).max()
        assert resid <= 1e-12 * scale
        assert costs[k] == pytest.approx(np.abs(flows[k]).sum(), rel=1e-14, abs=0)
    np.testing.assert_allclose(grid_w1(supply), costs, rtol=1e-14, atol=0)
    return flows, costs


# --------------------------------------------------------------------------------------------
# conventions and degenerate cases
# --------------------------------------------------------------------------------------------


def test_sign_conventions():
    # x = mass at (0, 0), y = mass at (0, 1): h[0, 0] = +1
    flows, costs = check(np.array([[[-1.0, 1.0]]]))
    np.testing.assert_array_equal(flows, [[1.0]])
    assert costs[0] == 1.0
    # vertical: v[0, 0] moves mass from (0, 0) down to (1, 0); here it goes up
    flows, costs = check(np.array([[[1.0], [-1.0]]]))
    np.testing.assert_array_equal(flows, [[-1.0]])
    # x + A flow == y
    x = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    y = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    flows, costs = check((y - x)[None])
    np.testing.assert_allclose(x + divergence(flows[0], 2, 3), y, atol=1e-15)
    assert costs[0] == pytest.approx(pot_w1(x, y), abs=1e-12)


def test_one_pixel_and_empty_batch():
    flows, costs = grid_min_cost_flow(np.zeros((3, 1, 1)))
    assert flows.shape == (3, 0)
    np.testing.assert_array_equal(costs, 0.0)
    flows, costs = grid_min_cost_flow(np.zeros((0, 4, 5)))
    assert flows.shape == (0, 31) and costs.shape == (0,)
    assert grid_w1(np.zeros((0, 4, 5))).shape == (0,)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2), (5, 4), (28, 28)])
def test_zero_supply(shape):
    flows, costs = check(np.zeros((2, *shape)))
    np.testing.assert_array_equal(flows, 0.0)
    np.testing.assert_array_equal(costs, 0.0)


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (2, 2), (3, 5), (7, 4), (28, 28)])
def test_point_masses_in_corners(shape):
    h, w = shape
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    sups = []
    want = []
    for a in corners:
        for b in corners:
            s = np.zeros(shape)
            s[a] -= 1.0
            s[b] += 1.0
            sups.append(s)
            want.append(abs(a[0] - b[0]) + abs(a[1] - b[1]))
    _, costs = check(np.array(sups))
    np.testing.assert_array_equal(costs, want)


@pytest.mark.parametrize("w", [1, 2, 3, 10, 30])
def test_single_row_is_cdf_distance(w):
    rng = np.random.default_rng(w)
    x = rng.random((5, w)) * (rng.random((5, w)) < 0.5)
    y = rng.random((5, w))
    x = x / np.maximum(x.sum(1, keepdims=True), 1e-300)
    y = y / y.sum(1, keepdims=True)
    x[x.sum(1) == 0, 0] = 1.0
    s = y - x
    # 1-D: W1 = sum |cumsum(y - x)|, and the flow is the cumulative sum itself
    flows, costs = check(s[:, None, :])
    cums = np.cumsum(s, axis=1)[:, :-1]
    np.testing.assert_allclose(flows, -cums, atol=1e-15)
    np.testing.assert_allclose(costs, np.abs(cums).sum(1), atol=1e-14)
    # the same as a column
    flows_c, costs_c = check(s[:, :, None])
    np.testing.assert_allclose(flows_c, flows, atol=1e-15)
    np.testing.assert_allclose(costs_c, costs, atol=1e-14)


def test_exact_ties_integer_supply():
    # many equal-cost optima; integer data: the optimum is an exact integer
    s = np.zeros((1, 6, 6))
    s[0, ::2, ::2] = -1.0
    s[0, 1::2, 1::2] = 1.0
    _, costs = check(s)
    assert costs[0] == 18.0
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (20, 5, 5)).astype(float)
    y = rng.permuted(x.reshape(20, -1), axis=1).reshape(20, 5, 5)
    _, costs = check(y - x)
    want = [pot_w1(x[k], y[k]) for k in range(20)]
    np.testing.assert_allclose(costs, want, atol=1e-9)
    np.testing.assert_array_equal(costs, np.round(costs))


def test_tiny_and_scaled_masses():
    rng = np.random.default_rng(1)
    x = rng.random((4, 7, 6)) * (rng.random((4, 7, 6)) < 0.4)
    y = rng.random((4, 7, 6))
    x /= x.sum((1, 2), keepdims=True)
    y /= y.sum((1, 2), keepdims=True)
    _, base = check(y - x)
    for scale in (1e-300, 1e-200, 1e-30, 1e30):
        _, costs = check(scale * (y - x))
        np.testing.assert_allclose(costs, scale * base, rtol=1e-12)


def test_residual_imbalance_is_absorbed():
    rng = np.random.default_rng(2)
    x = rng.random((3, 8, 9))
    y = rng.random((3, 8, 9))
    x /= x.sum((1, 2), keepdims=True)
    y /= y.sum((1, 2), keepdims=True)
    s = y - x
    s[:, 3, 4] += 1e-13  # unbalanced by 1e-13
    flows, costs = grid_min_cost_flow(s)
    for k in range(3):
        resid = divergence(flows[k], 8, 9) - s[k]
        assert np.abs(resid).max() <= 2e-13
        assert abs(resid.sum() + 1e-13) <= 1e-15  # the imbalance sits at one pixel
        assert costs[k] == pytest.approx(pot_w1(x[k], y[k]), abs=1e-11)


def test_input_validation():
    with pytest.raises(ValueError):
        grid_w1(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        grid_w1(np.full((1, 3, 3), np.nan))
    with pytest.raises(ValueError):
        grid_min_cost_flow(np.zeros((1, 0, 3)))


def test_batch_matches_single_and_threads():
    rng = np.random.default_rng(3)
    x = rng.random((40, 9, 11)) * (rng.random((40, 9, 11)) < 0.3)
    x[:, 0, 0] += 1e-3
    y = rng.random((40, 9, 11))
    x /= x.sum((1, 2), keepdims=True)
    y /= y.sum((1, 2), keepdims=True)
    flows, costs = grid_min_cost_flow(y - x)  # threaded for B = 40 on >= 2 threads
    for k in (0, 17, 39):
        f1, c1 = grid_min_cost_flow((y - x)[k : k + 1])
        np.testing.assert_array_equal(f1[0], flows[k])
        assert c1[0] == costs[k]


def test_cache_fallback(monkeypatch):
    """Without a usable numba cache directory, functions compile without caching."""
    calls = []
    real_njit = simplex_kernels.njit

    def fake_njit(*args, cache=False, **kwargs):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(cache=False, **kwargs)

    monkeypatch.setattr(simplex_kernels, "njit", fake_njit)

    @simplex_kernels.jit_kernel()
    def add(a, b):
        return a + b

    assert add(2, 3) == 5
    assert calls == [True, False]


# --------------------------------------------------------------------------------------------
# random small grids against POT
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["dense", "sparse", "integer", "point"]))
    if kind == "dense":
        x, y = rng.random((h, w)), rng.random((h, w))
    elif kind == "sparse":
        x = rng.random((h, w)) * (rng.random((h, w)) < 0.3)
        y = rng.random((h, w)) * (rng.random((h, w)) < 0.3)
    elif kind == "integer":
        x = rng.integers(0, 3, (h, w)).astype(float)
        y = rng.integers(0, 3, (h, w)).astype(float)
    else:
        x, y = np.zeros((h, w)), np.zeros((h, w))
        x[rng.integers(h), rng.integers(w)] = 1.0
        y[rng.integers(h), rng.integers(w)] = 1.0
    if x.sum() == 0:
        x[0, 0] = 1.0
    if y.sum() == 0:
        y[-1, -1] = 1.0
    if kind == "integer":
        # equal integer masses: move the surplus onto one pixel
        d = x.sum() - y.sum()
        if d > 0:
            y[rng.integers(h), rng.integers(w)] += d
        else:
            x[rng.integers(h), rng.integers(w)] -= d
    else:
        x /= x.sum()
        y /= y.sum()
    return x, y


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_small_grids_vs_pot(prob):
    x, y = prob
    _, costs = check((y - x)[None])
    assert abs(costs[0] - pot_w1(x, y)) <= 1e-9 * max(1.0, x.sum())


# --------------------------------------------------------------------------------------------
# real digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    if not MNIST.exists():
        pytest.skip(f"{MNIST} not found")
    x = np.load(MNIST)["x"][8000:8021].astype(float)
    return x / x.sum((1, 2), keepdims=True)


def test_mnist_vs_uniform_and_other_digits(digits):
    x = digits[:20]
    ref = np.full((28, 28), 1 / 784)
    sup_u = ref[None] - x
    sup_d = digits[1:21] - x
    _, cu = check(sup_u)
    _, cd = check(sup_d)
    want_u = [pot_w1(x[k], ref) for k in range(20)]
    want_d = [pot_w1(x[k], digits[k + 1]) for k in range(20)]
    np.testing.assert_allclose(cu, want_u, rtol=0, atol=1e-9)
    np.testing.assert_allclose(cd, want_d, rtol=0, atol=1e-9)
    # symmetric problem, and reversing source and target reverses the flow
    fd, _ = grid_min_cost_flow(sup_d)
    fr, cr = grid_min_cost_flow(-sup_d)
    np.testing.assert_allclose(cr, cd, rtol=1e-13)
    np.testing.assert_allclose(divergence(-fr[3], 28, 28), sup_d[3], atol=1e-15)
