"""The attack's maps in the flow domain: the feasible maps (flowverify.transport.projection),
the budgeted mass moves (transport_plans) and the compiled step (pgd_step)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from flowverify.transport.grid import adjoint, divergence, flow_dim, incidence_matrix
from flowverify.transport.projection import (
    feasible_map,
    fix_rounding,
    limit_step,
    project_l1_ball,
    shrink_to_ball,
)
from flowverify.transport.transport_plans import best_moves, realise, route


def _l1(w: torch.Tensor) -> torch.Tensor:
    return w.abs().flatten(1).sum(1)


def _images(rng, n, c, h, w, zeros=0.5):
    x = rng.random((n, c, h, w))
    x[rng.random(x.shape) < zeros] = 0.0
    x[..., 0, 0] += 0.1  # positive mass in every channel
    return torch.as_tensor(x)


def _sort_projection(v: np.ndarray, r: float) -> np.ndarray:
    a = np.abs(v)
    if a.sum() <= r:
        return v
    if r == 0:
        return np.zeros_like(v)
    u = np.sort(a)[::-1]
    cs = np.cumsum(u)
    j = np.arange(1, a.size + 1)
    hits = np.nonzero(u * j > cs - r)[0]
    rho = hits[-1] if hits.size else 0  # j = 1 always qualifies (exactly: u_1 > u_1 - r)
    theta = (cs[rho] - r) / (rho + 1)
    return np.sign(v) * np.maximum(a - theta, 0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(1, 60),
    r=st.floats(0.0, 5.0, allow_nan=False),
)
def test_l1_projection_exact_with_enough_newton_steps(seed, d, r):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((2, d)) * rng.choice([0.01, 1.0, 10.0])
    radius = torch.tensor([r, r * 0.5], dtype=torch.float64)
    exact = np.stack([_sort_projection(v[i], float(radius[i])) for i in range(2)])
    got = project_l1_ball(torch.as_tensor(v), radius, iters=d + 2).numpy()
    np.testing.assert_allclose(got, exact, atol=1e-9, rtol=1e-9)
    # few Newton steps: theta never passes the root, so the norm is never below r
    few = project_l1_ball(torch.as_tensor(v), radius, iters=1)
    norms = _l1(few).numpy()
    inside = np.abs(v).sum(1) <= radius.numpy()
    tol = 1e-12 * np.abs(v).sum(1)
    assert np.all(norms[~inside] >= radius.numpy()[~inside] - tol[~inside])
    # (plus a few subnormal units: a subnormal radius has no relative precision)
    bound = radius.numpy() * (1 + 1e-12) + 1e-320
    assert np.all(_l1(shrink_to_ball(few, radius)).numpy() <= bound)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(2, 6),
    w=st.integers(2, 6),
    c=st.integers(1, 2),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    radius=st.floats(0.0, 3.0, allow_nan=False),
    with_upper=st.booleans(),
)
def test_feasible_map_returns_points_of_the_set(seed, h, w, c, scale, radius, with_upper):
    """B_r(0) ∩ {0 <= µ + Aw (<= u)} for random anchors and arbitrary candidates."""
    rng = np.random.default_rng(seed)
    n = 3
    mu = _images(rng, n, c, h, w)
    upper = None
    if with_upper:
        upper = mu.amax(dim=(2, 3), keepdim=True) + torch.as_tensor(rng.random((n, c, 1, 1)))
    rad = torch.full((n,), radius, dtype=torch.float64)
    d = flow_dim(h, w)
    # a feasible anchor: a limited random step from µ, shrunk into the ball
    anchor = limit_step(mu, torch.as_tensor(rng.standard_normal((n, c, d))), upper=upper)
    anchor = shrink_to_ball(anchor, rad)
    x = mu + divergence(anchor, h, w)
    assert float(x.min()) >= -1e-12
    cand = torch.as_tensor(rng.standard_normal((n, c, d)) * scale)
    out = feasible_map(anchor, cand, x, rad, upper=upper)
    img = mu + divergence(out, h, w)
    assert torch.all(_l1(out) <= rad * (1 + 1e-12) + 1e-15)
    assert float(img.min()) >= -1e-12
    if upper is not None:
        assert torch.all(img <= upper + 1e-12)
    torch.testing.assert_close(img.sum(dim=(2, 3)), mu.sum(dim=(2, 3)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(2, 6), w=st.integers(2, 6))
def test_limit_step_only_shrinks_coordinates(seed, h, w):
    rng = np.random.default_rng(seed)
    mu = _images(rng, 2, 1, h, w)
    step = torch.as_tensor(rng.standard_normal((2, 1, flow_dim(h, w))))
    upper = mu.amax(dim=(2, 3), keepdim=True) + 0.2
    out = limit_step(mu, step, upper=upper)
    assert torch.all(out * step >= 0)
    assert torch.all(out.abs() <= step.abs())
    img = mu + divergence(out, h, w)
    assert float(img.min()) >= -1e-12 and torch.all(img <= upper + 1e-12)


def test_fix_rounding_removes_tiny_violations_without_changing_mass():
    rng = np.random.default_rng(3)
    h = w = 5
    mu = _images(rng, 4, 1, h, w)
    flow = limit_step(mu, torch.as_tensor(rng.standard_normal((4, 1, flow_dim(h, w)))))
    # push every flow a little: tiny negative pixels appear
    flow = flow * (1 + 1e-9)
    assert float((mu + divergence(flow, h, w)).min()) < 0
    fixed, img = fix_rounding(mu, flow)
    assert float(img.min()) >= 0
    assert torch.all(_l1(fixed) <= _l1(flow))
    torch.testing.assert_close(img, mu + divergence(fixed, h, w))
    torch.testing.assert_close(img.sum(dim=(2, 3)), mu.sum(dim=(2, 3)), rtol=0, atol=1e-14)
    # with an upper bound
    upper = mu.amax(dim=(2, 3), keepdim=True) * 0 + (mu + divergence(flow, h, w)).amax() * 0.999
    upper = torch.maximum(upper, mu.amax(dim=(2, 3), keepdim=True))
    fixed, img = fix_rounding(mu, flow, upper=upper)
    assert float(img.min()) >= 0 and torch.all(img <= upper)


def test_route_moves_mass_between_the_endpoints():
    amount = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    di = torch.zeros(1, 1, 4, 5, dtype=torch.long)
    dj = torch.zeros_like(di)
    amount[0, 0, 3, 4], di[0, 0, 3, 4], dj[0, 0, 3, 4] = 0.5, -3, -2
    amount[0, 0, 1, 1], di[0, 0, 1, 1], dj[0, 0, 1, 1] = 0.25, 1, 2
    flow = route(amount, di, dj)
    change = divergence(flow, 4, 5)[0, 0]
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[3, 4] -= 0.5
    expected[0, 2] += 0.5
    expected[1, 1] -= 0.25
    expected[2, 3] += 0.25
    torch.testing.assert_close(change, expected)
    assert abs(float(flow.abs().sum()) - (0.5 * 5 + 0.25 * 3)) < 1e-12


def _lp_best_gain(phi: np.ndarray, cap: np.ndarray, budget: float) -> float:
    """max φᵀAw s.t. ||w||_1 <= budget, cap + Aw >= 0 (one channel), by HiGHS."""
    h, w = phi.shape
    a = incidence_matrix(h, w)
    d = a.shape[1]
    c = -np.concatenate([a.T @ phi.ravel(), -(a.T @ phi.ravel())])
    a_ub = sp.vstack([sp.hstack([-a, a]), sp.csr_matrix(np.ones((1, 2 * d)))]).tocsr()
    b_ub = np.concatenate([cap.ravel(), [budget]])
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("seed", range(4))
def test_best_moves_is_the_exact_linear_maximiser(seed):
    """With a reach of the grid diameter, the greedy knapsack equals the LP optimum."""
    rng = np.random.default_rng(seed)
    h, w = 4, 5
    phi = rng.standard_normal((h, w))
    cap = rng.random((h, w))
    cap[rng.random((h, w)) < 0.4] = 0
    t_phi = torch.as_tensor(phi)[None, None]
    t_cap = torch.as_tensor(cap)[None, None]
    plan = best_moves(t_phi, t_cap, reach=h + w - 2)
    for budget in (0.05, 0.3, 1.0, 5.0):
        b = torch.tensor([budget], dtype=torch.float64)
        lp = _lp_best_gain(phi, cap, budget)
        assert abs(float(plan.gain_at(b)[0]) - lp) <= 1e-9 * max(1.0, abs(lp))
        flow = realise(plan, b)
        img = t_cap + divergence(flow, h, w)
        assert float(img.min()) >= -1e-12
        assert float(_l1(flow)[0]) <= budget * (1 + 1e-9)
        gain = float((divergence(flow, h, w) * t_phi).sum())
        assert abs(gain - lp) <= 1e-9 * max(1.0, abs(lp))
        need = torch.tensor([lp * 0.5], dtype=torch.float64)
        beta = float(plan.budget_for_gain(need)[0])
        assert beta <= budget * (1 + 1e-9)
        assert (
            abs(float(plan.gain_at(torch.tensor([beta], dtype=torch.float64))[0]) - lp * 0.5) < 1e-9
        )


def test_best_moves_respects_room():
    rng = np.random.default_rng(7)
    h, w = 5, 5
    phi = torch.as_tensor(rng.standard_normal((2, 1, h, w)))
    cap = torch.as_tensor(rng.random((2, 1, h, w)))
    room = torch.as_tensor(rng.random((2, 1, h, w))) * 0.1
    room[..., 2, 2] = 0
    plan = best_moves(phi, cap, reach=3, room=room)
    flow = realise(plan, torch.tensor([0.5, 2.0], dtype=torch.float64), room=room)
    change = divergence(flow, h, w)
    assert float((cap + change).min()) >= -1e-12
    assert torch.all(change <= room + 1e-12)


@pytest.mark.parametrize("with_upper", [False, True])
def test_compiled_step_equals_torch_step(with_upper):
    """The numba CPU kernel and the torch operations compute the same map."""
    from flowverify.transport.pgd_step import _pgd_step_torch, compiled_available, pgd_step_images

    if not compiled_available():  # pragma: no cover - numba is a dependency
        pytest.skip("numba unavailable")
    rng = np.random.default_rng(11)
    n, c, h, w = 4, 2, 5, 6
    mu = _images(rng, n, c, h, w)
    upper = mu.amax(dim=(2, 3), keepdim=True) + 0.3 if with_upper else None
    rad = torch.as_tensor(rng.random(n) + 0.1)
    d = flow_dim(h, w)
    anchor = shrink_to_ball(
        limit_step(mu, torch.as_tensor(rng.standard_normal((n, c, d))), upper=upper), rad
    )
    x = mu + divergence(anchor, h, w)
    grad_x = torch.as_tensor(rng.standard_normal((n, c, h, w)))
    alpha = rad * 0.3
    fast, x_fast = pgd_step_images(anchor, x, grad_x, mu, rad, alpha, upper=upper, tau=1e-9)
    slow = _pgd_step_torch(anchor, x, adjoint(grad_x), rad, alpha, upper=upper, tau=1e-9)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_fast, mu + divergence(fast, h, w), rtol=0, atol=1e-12)
    assert float(x_fast.min()) >= -1e-12 and torch.all(_l1(fast) <= rad * (1 + 1e-12))
    if upper is not None:
        assert torch.all(x_fast <= upper + 1e-12)
