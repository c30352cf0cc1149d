"""Bound propagation over the L1 ball and the feasibility polytope (Theorems 3, 6; Lemma 5).

Exact facts: the polytope dual equals the LP optimum, never exceeds the ball value; CROWN
bounds contain every sampled pre-activation (ball, polytope, ReLU splits); Lemma 7's
closed form; the radius search converges to its tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from torch import nn

import flowverify as fv
from conftest import relu_net
from flowverify.io.images import load_images
from flowverify.transport.flows import apply_flow_adjoint, incidence_matrix
from flowverify.verification import ball as _ball
from flowverify.verification import flownet as _flownet
from flowverify.verification import polytope as _polytope
from flowverify.verification import search as _search
from flowverify.verification._chain import affine_chain
from flowverify.verification._exact import _block_incidence
from flowverify.verification._relaxlp import Problem
from flowverify.verification.chain_bounds import relu_bounds


def _lp_gain(q, mu, eps):
    """max q^T(mu - nu) over nu = mu + A g >= 0, ||g||_1 <= eps (flow LP, scipy/HiGHS)."""
    c, h, w = mu.shape
    a = sp.block_diag([incidence_matrix(h, w)] * c).tocsr()
    n = a.shape[1]
    coef = a.T @ q.ravel()
    a_ub = sp.vstack([sp.hstack([-a, a]), sp.csr_matrix(np.ones((1, 2 * n)))])
    b_ub = np.concatenate([mu.ravel(), [eps]])
    res = linprog(
        np.concatenate([coef, -coef]), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs"
    )
    assert res.status == 0
    return -res.fun


def _random_problem(rng, c=1):
    h, w = rng.integers(2, 6, size=2)
    mu = rng.random((c, h, w)) * (rng.random((c, h, w)) < 0.6)
    mu[:, 0, 0] += 0.1
    return mu, rng.normal(size=(4, c * h * w))


@pytest.mark.parametrize("c", [1, 2])
def test_polytope_gain_is_the_lp_optimum(c):
    rng = np.random.default_rng(c)
    for _ in range(6):
        mu, q = _random_problem(rng, c)
        eps = float(rng.random() * 3)
        gain = _polytope.polytope_gain(q, mu, eps)
        exact = np.array([_lp_gain(row, mu, eps) for row in q])
        np.testing.assert_allclose(gain, exact, rtol=1e-9, atol=1e-9)
        ball = eps * np.array(
            [np.abs(apply_flow_adjoint(row.reshape(mu.shape))).max() for row in q]
        )
        assert np.all(gain <= ball + 1e-12) and np.all(gain >= -1e-12)


@pytest.mark.parametrize("c", [1, 2])
def test_polytope_gain_of_local_rows_is_the_lp_optimum(c):
    """Rows supported on a small window (a convolution's), where the kernels run the
    distance transform on the window grown by ``max|q| / θ`` only: still the LP optimum,
    for budgets from tiny (large ``θ``, a small box) to the whole image; the plan's
    image attains it and the radius is sound."""
    rng = np.random.default_rng(10 + c)
    h, w = 12, 11
    mu = rng.random((c, h, w)) * (rng.random((c, h, w)) < 0.5)
    q = np.zeros((6, c, h, w))
    for k in range(6):
        i, j = rng.integers(0, h - 3), rng.integers(0, w - 3)
        q[k, :, i : i + 3, j : j + 3] = rng.normal(size=(c, 3, 3)) * 10.0 ** rng.integers(-2, 2)
    q[5, :, :3, :3] = 1.5  # at the corner: the grown box is clipped by the border
    q = q.reshape(6, -1)
    for eps in (1e-3, 0.05, 0.4, 3.0, 40.0):
        gain = _polytope.polytope_gain(q, mu, eps)
        exact = np.array([_lp_gain(row, mu, eps) for row in q])
        np.testing.assert_allclose(gain, exact, rtol=1e-9, atol=1e-9)
        nu = _polytope.polytope_plan(q, mu, eps)
        for k in range(6):
            np.testing.assert_allclose(
                q[k] @ (mu.ravel() - nu[k].ravel()), exact[k], rtol=1e-7, atol=1e-9
            )
    margin = np.abs(rng.normal(size=6)) + 0.01
    rad = _polytope.polytope_radius(q, mu, margin)
    for k in range(6):
        if np.isfinite(rad[k]):
            assert _lp_gain(q[k], mu, rad[k]) <= margin[k] + 1e-9


@pytest.mark.parametrize("c", [1, 2])
def test_polytope_gain_from_kept_evaluations_is_the_lp_optimum(c):
    """Gains started from the dual evaluations of earlier calls (``planes``): of the same
    rows at other budgets (bounds at any ``ε``), and of other rows (starting points
    only), equal the LP optimum; the sparse-row kernel gives the dense one's gains."""
    rng = np.random.default_rng(20 + c)
    mu, q = _random_problem(rng, c)
    b = np.stack([mu, mu])
    img = np.array([0, 0, 1, 1])
    planes = np.full((4, 4, 3), -1.0)
    for eps in (0.5, 0.2, 0.5, 0.51, 2.0, 0.0, 1e-4, 0.3):
        e = np.full(4, eps)
        gain = _polytope.polytope_gain_rows(q, b, img, e, planes=planes)
        exact = np.array([_lp_gain(row, mu, eps) for row in q])
        np.testing.assert_allclose(gain, exact, rtol=1e-9, atol=1e-9)
    assert (planes[..., 0] >= 0).any()
    other = q + rng.normal(size=q.shape) * 0.3
    gain = _polytope.polytope_gain_rows(other, b, img, np.full(4, 0.4), planes=planes, same=False)
    exact = np.array([_lp_gain(row, mu, 0.4) for row in other])
    np.testing.assert_allclose(gain, exact, rtol=1e-9, atol=1e-9)
    # rows given by their entries on a sparse map G (here the rows of q themselves)
    csr = sp.csr_matrix(other)
    rows = (
        np.ones((1, 4, 1)),
        np.arange(4).reshape(1, 4, 1),
        csr.indptr.astype(np.int64),
        csr.indices.astype(np.int64),
        csr.data,
        _ball.row_boxes(csr.indptr, csr.indices, *mu.shape[1:]),
        np.ones((2, c)),
    )
    sparse = _polytope.polytope_gain_sparse_rows(rows, img, np.arange(4), b, np.full(4, 0.4))
    np.testing.assert_allclose(sparse, exact, rtol=1e-9, atol=1e-9)


def test_polytope_gain_with_a_loose_tolerance_is_sound_and_within_it():
    """``tol`` stops the dual's search early: never below the LP optimum (every value is
    the dual's at some ``θ``), above it by at most ``tol·(gain + ‖Aᵀq‖_∞ ε)``."""
    rng = np.random.default_rng(7)
    for _ in range(4):
        mu, q = _random_problem(rng, 2)
        eps = float(rng.random() * 3)
        exact = np.array([_lp_gain(row, mu, eps) for row in q])
        ball = eps * np.array(
            [np.abs(apply_flow_adjoint(row.reshape(mu.shape))).max() for row in q]
        )
        img = np.zeros(4, dtype=np.int64)
        for tol in (1e-2, 0.3):
            gain = _polytope.polytope_gain_rows(q, mu[None], img, np.full(4, eps), tol=tol)
            assert np.all(gain >= exact - 1e-9)
            assert np.all(gain <= exact + tol * (np.abs(gain) + ball) + 1e-9)
    with pytest.raises(ValueError, match="tol"):
        _polytope.polytope_gain_rows(q, mu[None], img, np.full(4, eps), tol=-1.0)


def test_polytope_radius_is_tight_and_sound():
    rng = np.random.default_rng(3)
    for _ in range(5):
        mu, q = _random_problem(rng)
        margin = rng.random(4) * 2 + 0.05
        rad = _polytope.polytope_radius(q, mu, margin)
        for k in range(4):
            if not np.isfinite(rad[k]):
                assert _lp_gain(q[k], mu, 1e3) <= margin[k] + 1e-9
                continue
            assert _lp_gain(q[k], mu, rad[k]) <= margin[k] + 1e-9
            assert _lp_gain(q[k], mu, rad[k] * (1 + 1e-6) + 1e-9) >= margin[k] - 1e-7


def test_polytope_plan_is_a_feasible_maximiser():
    rng = np.random.default_rng(4)
    for _ in range(5):
        mu, q = _random_problem(rng)
        eps = float(rng.random() * 2)
        nu = _polytope.polytope_plan(q, mu, eps)
        for k in range(len(q)):
            assert nu[k].min() >= -1e-12
            np.testing.assert_allclose(nu[k].sum(), mu.sum(), rtol=1e-12)
            assert float(fv.w1_distance(np.maximum(nu[k], 0), mu, unit="raw")) <= eps + 1e-9
            np.testing.assert_allclose(
                q[k] @ (mu - nu[k]).ravel(), _lp_gain(q[k], mu, eps), rtol=1e-7, atol=1e-9
            )


def test_flow_weights_to_image_space():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2)
    img = torch.rand(1, 2, 7, 7, dtype=torch.float64)
    fm = fv.FlowModel(
        nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)).double(), img, fuse=True
    )
    chain = affine_chain(fm, 0)
    g, resid = _flownet.flow_to_image_weights(chain.weights[0], (2, 7, 7))
    back = apply_flow_adjoint(g.reshape(-1, 2, 7, 7)).reshape(g.shape[0], -1)
    assert np.abs(back - chain.weights[0]).max(axis=1).max() <= resid.max() <= 1e-12
    # convolution rows stay sparse (receptive field only)
    assert np.count_nonzero(g) <= 0.5 * g.size


def _net(seed, sizes, c=1, h=6, w=6, conv=False):
    return relu_net(seed, sizes, c=c, h=h, w=w, conv=3 if conv else None)


def _setup(model, x, label=0):
    ref = fv.make_reference("uniform", x)
    dmu = fv.inverse_flow(ref, x).reshape(-1)
    chain = affine_chain(fv.FlowModel(model, torch.as_tensor(ref), fuse=True), 0)
    return chain, dmu, ref


def _problem(chain, dmu, ref, x, feasible=True, label=0):
    c, h, w = x.shape
    weights = [np.asarray(wk, dtype=np.float64) for wk in chain.weights]
    biases = [np.asarray(bk, dtype=np.float64) for bk in chain.biases]
    return Problem(
        weights,
        biases,
        np.asarray(dmu, dtype=np.float64).reshape(-1),
        np.asarray(ref, dtype=np.float64).reshape(-1),
        label,
        height=h,
        width=w,
        channels=c,
        feasible=feasible,
        amat=_block_incidence(h, w, c),
    )


def _samples(rng, x, eps, n, feasible):
    """Flow perturbations g with ||g||_1 <= eps (and x + A g >= 0 when feasible)."""
    c, h, w = x.shape
    a = sp.block_diag([incidence_matrix(h, w)] * c).tocsr()
    out = []
    while len(out) < n:
        g = rng.standard_cauchy(a.shape[1]) * (rng.random(a.shape[1]) < 0.3)
        g *= eps * rng.random() ** 0.3 / max(np.abs(g).sum(), 1e-12)
        if feasible:
            img = x.ravel() + a @ g
            if img.min() < 0:
                continue
        out.append(g)
    return np.array(out)


def _activations(chain, delta):
    pre = []
    z = delta @ chain.weights[0].T + chain.biases[0]
    for wk, bk in zip(chain.weights[1:], chain.biases[1:], strict=True):
        pre.append(z)
        z = np.maximum(z, 0) @ wk.T + bk
    return pre


@pytest.mark.parametrize("feasible", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_relu_bounds_contain_samples(feasible, conv):
    rng = np.random.default_rng(7)
    x = rng.random((2 if conv else 1, 6, 6))
    model = _net(1, [8, 6, 3], c=x.shape[0], conv=conv)
    chain, dmu, ref = _setup(model, x)
    eps = 0.6
    prob = _problem(chain, dmu, ref, x, feasible)
    bnds = relu_bounds(prob, eps)
    pts = dmu + _samples(rng, x, eps, 300, feasible)
    for (lo, up), z in zip(bnds, _activations(chain, pts), strict=True):
        assert np.all(z >= lo - 1e-9) and np.all(z <= up + 1e-9)
    if feasible:  # the polytope never loosens a bound
        ball = relu_bounds(prob, eps, feasible=False)
        for (lo, up), (bl, bu) in zip(bnds, ball, strict=True):
            assert np.all(lo >= bl - 1e-12) and np.all(up <= bu + 1e-12)


def test_relu_bounds_with_splits():
    rng = np.random.default_rng(8)
    x = rng.random((1, 6, 6))
    model = _net(2, [10, 8, 3])
    chain, dmu, ref = _setup(model, x)
    eps = 0.8
    prob = _problem(chain, dmu, ref, x)
    lo0, up0 = relu_bounds(prob, eps)[0]
    unstable = np.flatnonzero((lo0 < 0) & (up0 > 0))
    assert unstable.size >= 2
    splits = [np.zeros(10, dtype=np.int8), np.zeros(8, dtype=np.int8)]
    centre = chain.weights[0] @ dmu + chain.biases[0]
    u0, u1 = unstable[:2]
    splits[0][u0], splits[0][u1] = np.where(centre[[u0, u1]] >= 0, 1, -1)
    bnds = relu_bounds(prob, eps, splits=splits)
    for u in (u0, u1):
        assert (bnds[0][0][u] >= 0) if splits[0][u] > 0 else (bnds[0][1][u] <= 0)
    pts = dmu + _samples(rng, x, eps, 2000, True)
    pre = _activations(chain, pts)
    keep = (pre[0][:, u0] * splits[0][u0] >= 0) & (pre[0][:, u1] * splits[0][u1] >= 0)
    assert keep.sum() > 10
    for (lo, up), z in zip(bnds, pre, strict=True):
        assert np.all(z[keep] >= lo - 1e-9) and np.all(z[keep] <= up + 1e-9)


def test_linear_ball_radius_is_lemma_7():
    rng = np.random.default_rng(9)
    x = rng.random((1, 5, 5))
    model = _net(3, [4], h=5, w=5)
    chain, dmu, ref = _setup(model, x)
    label = int(np.argmax(chain.forward(dmu)))
    w_t = chain.weights[0][label] - chain.weights[0]
    d_t = chain.biases[0][label] - chain.biases[0]
    others = [t for t in range(4) if t != label]
    lemma7 = min((w_t[t] @ dmu + d_t[t]) / np.abs(w_t[t]).max() for t in others)
    from flowverify.verification.engine import EngineProblem, build_graph, make_domain

    m64 = model.double().eval()
    graph = build_graph(m64, torch.as_tensor(x[None]))
    prob = EngineProblem(graph, x[None], [label], make_domain("w1-ball", x[None]))
    got = float(prob(np.array([0]), np.array([1.0]))[0])  # F(ε) does not depend on ε
    np.testing.assert_allclose(got, lemma7, rtol=1e-8)


def test_search_radius_finds_the_fixed_point():
    # F(e) = e* - 0.7 (e - e*): decreasing, fixed point e*
    e_star = np.array([0.3, 2.0, 5.0])

    def oracle(idx, e):
        return np.maximum(e_star[idx] - 0.7 * (e - e_star[idx]), 0.0)

    res = _search.search_radius(oracle, np.full(3, 100.0), rtol=1e-3)
    assert np.all(res.converged) and np.all(res.lower <= e_star + 1e-12)
    assert np.all(res.lower >= e_star / (1 + 1e-3))
    assert np.all(res.probes <= 12)
    start = _search.search_radius(oracle, np.full(3, 100.0), lower_init=e_star * 0.9)
    assert np.all(start.lower >= e_star * 0.9) and np.all(start.converged)


def _exact_pair_norms(lam, G, scale, c, h, w):
    """``‖Aᵀ(Λ_r G) scale‖_∞`` per row in extended precision (the reference)."""
    q = lam.astype(np.longdouble) @ G.astype(np.longdouble)  # (nb, m, C*H*W)
    x = q.reshape(*q.shape[:2], c, h, w)
    dh = np.abs(np.diff(x, axis=-1)).max(axis=(-2, -1))
    dv = np.abs(np.diff(x, axis=-2)).max(axis=(-2, -1))
    return (np.maximum(dh, dv) * scale[:, None, :]).max(axis=-1)


def _cancelling_pairs(rng, nb=3, half=6, n0=40, c=1, h=7, w=6):
    """Paired rows (``r``, ``r + half``) over nearly equal rows of ``G``: the sums cancel."""
    G = 3.0 + 1e-4 * rng.normal(size=(n0, c * h * w))
    lam = rng.normal(size=(nb, 2 * half, n0)) * 50
    lam[:, :half] -= lam[:, :half].mean(axis=2, keepdims=True)  # Σ_k a_k = 0
    lam[:, half:, : n0 // 2] = -lam[:, :half, : n0 // 2]  # the a2 == -a branch
    lam[:, :, ::7] = 0.0
    scale = rng.uniform(0.5, 2.0, size=(nb, c))
    return lam, G, scale


@pytest.mark.parametrize("seed", range(4))
def test_float32_norm_is_a_rigorous_upper_bound(seed):
    rng = np.random.default_rng(seed)
    c, h, w = (1, 7, 6) if seed % 2 == 0 else (2, 5, 4)
    lam, G, scale = _cancelling_pairs(rng, c=c, h=h, w=w)
    rows = np.ones(lam.shape[:2], dtype=np.bool_)
    rows[0, 1] = rows[0, 1 + lam.shape[1] // 2] = False
    G32, gmax = G.astype(np.float32), np.abs(G).max(axis=1)
    got = _ball._lam_g_lip(lam, G, scale, rows, c, h, w, G32=G32, g_absmax=gmax)
    exact = _exact_pair_norms(lam, G, scale, c, h, w)
    exact[~rows] = 0.0
    err = _ball._f32_dot_error(lam, gmax, scale)
    assert np.all(got >= exact)
    assert np.all(got <= exact * (1 + 1e-6) + 2 * err)  # error either way, then + err
    # the error term is needed: float32 sums alone fall below the exact norm here
    raw = _ball._blas_rows_lip(
        lam.astype(np.float32).astype(np.float64),
        torch.from_numpy(G32.astype(np.float64)),
        scale,
        rows,
        c,
        h,
        w,
    )  # the float32 inputs, summed without rounding error (nearly: in float64)
    assert np.any(raw < exact)


def test_float32_norm_falls_back_to_float64_on_huge_coefficients():
    rng = np.random.default_rng(5)
    lam, G, scale = _cancelling_pairs(rng)
    lam *= 1e35
    rows = np.ones(lam.shape[:2], dtype=np.bool_)
    gmax = np.abs(G).max(axis=1)
    assert _ball._f32_dot_error(lam, gmax, scale) is None
    got = _ball._lam_g_lip(lam, G, scale, rows, 1, 7, 6, G32=G.astype(np.float32), g_absmax=gmax)
    ref = _ball._lam_g_lip(lam, G, scale, rows, 1, 7, 6)
    np.testing.assert_array_equal(got, ref)


def test_float32_norm_needs_ieee_float32_products():
    """Where torch may form float32 products at a lower precision (TF32, bfloat16), the
    norms are float64 sums: the same values as without a float32 copy."""
    rng = np.random.default_rng(6)
    lam, G, scale = _cancelling_pairs(rng)
    rows = np.ones(lam.shape[:2], dtype=np.bool_)
    gmax = np.abs(G).max(axis=1)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = _ball._lam_g_lip(
            lam, G, scale, rows, 1, 7, 6, G32=G.astype(np.float32), g_absmax=gmax
        )
    finally:
        torch.set_float32_matmul_precision(prev)
    np.testing.assert_array_equal(got, _ball._lam_g_lip(lam, G, scale, rows, 1, 7, 6))


def test_vanilla_radii_with_float32_norms_match_float64(monkeypatch):
    x, y = load_images("bundled", indices="0:8")
    r32 = np.array([r.radius for r in fv.certify("fc", x, y, method="vanilla")])
    # every FlowNet built now has no float32 copy
    monkeypatch.setattr(_flownet, "_F32_SAFE", 0.0)
    monkeypatch.setattr(_ball, "_F32_SAFE", 0.0)
    r64 = np.array([r.radius for r in fv.certify("fc", x, y, method="vanilla")])
    assert np.any(r64 > 0)
    np.testing.assert_allclose(r32, r64, rtol=2e-3)


def test_polytope_radius_with_a_slope_and_beyond_every_budget():
    """``gain(ε) + extra·ε <= margin`` solved tightly with a slope ``extra`` (the first
    layer's residual); a margin no transport can use up gives ``inf`` without a slope and
    a finite radius with one (the searches' ``θ = 0`` end)."""
    rng = np.random.default_rng(8)
    mu, q = _random_problem(rng)
    full = _polytope.polytope_gain(q, mu, 1e4)  # every budget: all mass anywhere
    for margin, extra in ((full * 0.3 + 0.01, 0.05), (full * 2 + 0.1, 0.0), (full * 2 + 0.1, 0.2)):
        rad = _polytope.polytope_radius(q, mu, margin, extra=extra)
        for k in range(len(q)):
            if extra == 0.0:
                assert rad[k] == np.inf
                continue
            gain = _lp_gain(q[k], mu, rad[k])
            assert gain + extra * rad[k] <= margin[k] + 1e-9
            up = rad[k] * (1 + 1e-6) + 1e-9
            assert _lp_gain(q[k], mu, up) + extra * up >= margin[k] - 1e-7
