r"""Sound bounds of flow-domain ReLU networks over the L1 ball and the feasibility polytope.

The flow-domain network of an image (Corollary 2.1, :mod:`flowverify.verification._chain`) is

.. math::

    z_0 = \tilde W \delta + \tilde b, \qquad z_k = W_k\,\mathrm{relu}(z_{k-1}) + b_k,
    \qquad \text{logits} = z_{L-1},

with :math:`\tilde W = WA / s` (``s`` the input scale).  Two input regions (SPEC section 4):

* vanilla (Theorem 3): the L1 ball :math:`B_\varepsilon(\delta_\mu) = \{\delta :
  \|\delta - \delta_\mu\|_1 \le \varepsilon\}`;
* feasible (Lemma 5, Theorem 6): the polytope :math:`B_\varepsilon(\delta_\mu) \cap
  \{\delta : R + A\delta \ge 0\}`.

**CROWN** (linear bound propagation) writes every pre-activation and every margin
:math:`f_y - f_t` as :math:`\ge \Lambda z_0 + \beta` with ReLUs relaxed by the triangle's
upper line and a lower line of slope :math:`\alpha \in [0, 1]` (CROWN's adaptive choice,
or optimised by gradient: alpha-CROWN).  What remains is to minimise the linear function
:math:`a^T\delta`, :math:`a = \tilde W^T \Lambda^T`, over the region:

* over the ball, by the dual norm: :math:`\min a^T\delta = a^T\delta_\mu -
  \varepsilon\|a\|_\infty`;
* over the polytope, exactly, in image space.  Because the first layer is
  :math:`\tilde W = WA/s`, every such ``a`` is :math:`A^T q` for an image-space map
  ``q = Λ W / s`` (a residual ``E`` from rounding is bounded separately).  With
  :math:`\nu = R + A\delta` the polytope is the set of non-negative images with
  :math:`W_1(\mu, \nu) \le \varepsilon` (Theorem 1), and by LP duality

  .. math::

      \max_{\nu \ge 0,\ W_1(\mu,\nu) \le \varepsilon} q^T(\mu - \nu)
      = \min_{\theta \ge 0}\ \theta\varepsilon + \sum_p \mu_p\,\bigl(q_p - (q \,\square\,
      \theta d)(p)\bigr),
      \qquad (q \,\square\, \theta d)(p) = \min_{p'} q_{p'} + \theta\,\|p - p'\|_1 ,

  an L1 distance transform computed by four sweeps.  Every ``θ`` gives a sound bound,
  the minimum (bisection on the subgradient ``ε - T(θ)``, ``T`` the transport cost of
  the greedy plan) is the exact polytope minimum, and ``θ = ‖Aᵀq‖_∞`` recovers the ball
  bound, so the polytope bound is never looser than the vanilla one.

The certified radius of a fixed relaxation is read off directly: margins stay
positive for all :math:`\varepsilon' \le \varepsilon` up to
:math:`(c_t - \tau)/\|a_t\|_\infty` (ball; for a linear model this is Lemma 7's closed
form) or :math:`\max_\theta (c_t - \tau - K(\theta))/\theta` (polytope).

Soundness: all arithmetic is float64 except the dual norms of intermediate bounds on the
CPU, whose float32 sums carry a rigorous rounding-error term (:func:`_lam_g_lip`);
intermediate bounds are widened by
``BOUND_RTOL`` and margins must exceed ``MARGIN_RTOL * (1 + |c| + ε‖a‖)`` before a radius
counts as certified.  The public entry point for complete certifiers is
:func:`relu_bounds` (the ``bound_fn`` of :func:`flowverify.verification.complete.exact_radius`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from flowverify.transport.flows import apply_flow_adjoint, flow_dim

__all__ = [
    "BOUND_RTOL",
    "MARGIN_RTOL",
    "Batch",
    "FlowNet",
    "flow_to_image_weights",
    "margin_spec",
    "polytope_gain",
    "polytope_plan",
    "polytope_radius",
    "relu_bounds",
]

logger = logging.getLogger(__name__)

#: Relative widening of every intermediate bound (float64 rounding of CROWN).
BOUND_RTOL = 1e-11
#: A margin lower bound certifies only above ``MARGIN_RTOL * (1 + |c| + eps * ||a||)``.
MARGIN_RTOL = 1e-9
#: Bisection steps on the dual variable ``θ`` of the polytope bound.
THETA_ITERS = 40

_EPS64 = float(np.finfo(np.float64).eps)


# ============================================================== polytope kernels (numba)


@numba.njit(cache=True)
def _inf_conv(g, theta, C, H, W, h, arg):
    """``h[p] = min_q g[q] + θ‖p - q‖₁`` (per channel) and an argmin ``arg[p]``.

    Separable L1 distance transform: forward/backward passes along the rows, then along
    the columns; loops ordered so that the independent lines vectorise (branch-free).
    """
    hw = H * W
    for c in range(C):
        base = c * hw
        for p in range(base, base + hw):
            h[p] = g[p]
            arg[p] = p
        for j in range(1, W):
            for i in range(H):
                p = base + i * W + j
                v = h[p - 1] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p - 1] if better else arg[p]
        for j in range(W - 2, -1, -1):
            for i in range(H):
                p = base + i * W + j
                v = h[p + 1] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p + 1] if better else arg[p]
        for i in range(1, H):
            r = base + i * W
            for j in range(W):
                p = r + j
                v = h[p - W] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p - W] if better else arg[p]
        for i in range(H - 2, -1, -1):
            r = base + i * W
            for j in range(W):
                p = r + j
                v = h[p + W] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p + W] if better else arg[p]


@numba.njit(cache=True)
def _dual_terms(g, theta, src, mus, C, H, W, h, arg):
    """``K(θ) = Σ_p µ_p (g_p - h_θ(p))`` and the cost ``T(θ)`` of the greedy plan."""
    _inf_conv(g, theta, C, H, W, h, arg)
    hw = H * W
    k_val = 0.0
    t_val = 0.0
    for s in range(src.size):
        p = src[s]
        q = arg[p]
        k_val += mus[s] * (g[p] - h[p])
        pp = p % hw
        qq = q % hw
        t_val += mus[s] * (abs(pp // W - qq // W) + abs(pp % W - qq % W))
    return k_val, t_val


@numba.njit(cache=True)
def _grad_absmax(g, C, H, W):
    """``‖Aᵀg‖_∞``: the largest difference between 4-neighbour pixels."""
    hw = H * W
    out = 0.0
    for c in range(C):
        base = c * hw
        for i in range(H):
            for j in range(W):
                p = base + i * W + j
                if j + 1 < W:
                    d = abs(g[p + 1] - g[p])
                    if d > out:
                        out = d
                if i + 1 < H:
                    d = abs(g[p + W] - g[p])
                    if d > out:
                        out = d
    return out


@numba.njit(cache=True)
def _gain_one(g, src, mus, C, H, W, eps, iters, h, arg):
    """Sound upper bound (a dual value) on ``max q^T(µ - ν)`` over the W1 polytope.

    ``f(θ) = θε + K(θ)`` is convex and piecewise linear with ``f'(θ) = ε - T(θ)``: a
    bracketed cutting-plane search (Kelley; bisection every third step as a safeguard)
    whose lower model certifies optimality to ``1e-12`` relative.  Any evaluated ``θ``
    gives a sound bound; the smallest is returned.
    """
    lip = _grad_absmax(g, C, H, W)
    best = lip * eps  # θ = ‖Aᵀg‖_∞: K = 0 (the ball bound)
    if eps <= 0.0 or lip == 0.0 or src.size == 0:
        return best
    k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg)
    if k0 < best:
        best = k0
    if t0 <= eps:
        return best
    a, fa, da = 0.0, k0, eps - t0
    b, fb, db = lip, lip * eps, eps
    for it in range(iters):
        theta = (fb - fa + da * a - db * b) / (da - db)
        model = fa + da * (theta - a)  # lower bound on min f (two supporting lines)
        if best - model <= 1e-12 * (abs(best) + lip * eps):
            break
        if it % 3 == 2 or not (a < theta < b):
            theta = 0.5 * (a + b)
        k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg)
        f = theta * eps + k_val
        if f < best:
            best = f
        if b - a <= 1e-15 * lip:
            break
        d = eps - t_val
        if d < 0:
            a, fa, da = theta, f, d
        else:
            b, fb, db = theta, f, d
    return best


def _gain_rows_impl(q, src, mus, ptr, img, C, H, W, eps, iters):
    """Row ``r`` of ``q`` on image ``img[r]``, whose sources are ``src[ptr[i]:ptr[i+1]]``."""
    m = q.shape[0]
    out = np.empty(m)
    for r in numba.prange(m):
        h = np.empty(q.shape[1])
        arg = np.empty(q.shape[1], dtype=np.int64)
        i = img[r]
        s0, s1 = ptr[i], ptr[i + 1]
        out[r] = _gain_one(q[r], src[s0:s1], mus[s0:s1], C, H, W, eps[r], iters, h, arg)
    return out


_gain_rows_par = numba.njit(cache=True, parallel=True)(_gain_rows_impl)


def _one_image(src, m):
    """``ptr`` and ``img`` for rows that all belong to one image."""
    return np.array([0, src.size], dtype=np.int64), np.zeros(m, dtype=np.int64)


def _gain_rows(q, src, mus, C, H, W, eps, iters, ptr=None, img=None):
    if ptr is None:
        ptr, img = _one_image(src, q.shape[0])
    return _small_serial(
        _gain_rows_par, q.shape[0] * q.shape[1], q, src, mus, ptr, img, C, H, W, eps, iters
    )


@numba.njit(cache=True)
def _radius_one(g, src, mus, C, H, W, margin, extra, iters, h, arg):
    """Largest ``ε`` with ``gain(ε) + extra·ε <= margin`` (a sound lower estimate)."""
    if margin <= 0.0:
        return 0.0
    lip = _grad_absmax(g, C, H, W)
    if lip + extra <= 0.0:
        return np.inf
    best = margin / (lip + extra)
    if src.size == 0:
        return best
    k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg)
    if k0 < margin:
        if extra <= 0.0:
            return np.inf
        v = (margin - k0) / extra
        if v > best:
            best = v
    lo = 0.0
    hi = lip
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k_val, t_val = _dual_terms(g, mid, src, mus, C, H, W, h, arg)
        psi = (margin - k_val) / (mid + extra)
        if psi > best:
            best = psi
        if t_val > psi:  # ψ increasing at mid
            lo = mid
        else:
            hi = mid
    return best


def _radius_rows_impl(q, src, mus, ptr, img, C, H, W, margin, extra, iters):
    m = q.shape[0]
    out = np.empty(m)
    for r in numba.prange(m):
        h = np.empty(q.shape[1])
        arg = np.empty(q.shape[1], dtype=np.int64)
        i = img[r]
        s0, s1 = ptr[i], ptr[i + 1]
        out[r] = _radius_one(
            q[r], src[s0:s1], mus[s0:s1], C, H, W, margin[r], extra[r], iters, h, arg
        )
    return out


_radius_rows_par = numba.njit(cache=True, parallel=True)(_radius_rows_impl)


def _radius_rows(q, src, mus, C, H, W, margin, extra, iters, ptr=None, img=None):
    if ptr is None:
        ptr, img = _one_image(src, q.shape[0])
    return _small_serial(
        _radius_rows_par,
        q.shape[0] * q.shape[1],
        q,
        src,
        mus,
        ptr,
        img,
        C,
        H,
        W,
        margin,
        extra,
        iters,
    )


def _sources_batch(mu: np.ndarray):
    """Sources of every image ``mu (B, P)`` as one array: ``src, mus, ptr``."""
    srcs = [_sources(row) for row in mu]
    ptr = np.zeros(len(srcs) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([s.size for s, _ in srcs])
    src = np.concatenate([s for s, _ in srcs]) if srcs else np.zeros(0, np.int64)
    mus = np.concatenate([v for _, v in srcs]) if srcs else np.zeros(0)
    return src.astype(np.int64), np.ascontiguousarray(mus, dtype=np.float64), ptr


def polytope_gain_rows(q, mu, img, eps, *, iters: int = THETA_ITERS) -> np.ndarray:
    """:func:`polytope_gain` for rows of several images at once (one parallel kernel).

    ``q (m, C*H*W)``, ``mu (B, C, H, W)``, ``img (m,)``: the image of each row,
    ``eps (m,)``.  Returns ``(m,)``.
    """
    b, c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus, ptr = _sources_batch(np.asarray(mu, dtype=np.float64).reshape(b, -1))
    e = _per_row(eps, q.shape[0], "eps")
    img = np.ascontiguousarray(img, dtype=np.int64)
    return _gain_rows(q, src, mus, c, h, w, e, iters, ptr, img)


def polytope_radius_rows(q, mu, img, margin, *, iters: int = THETA_ITERS) -> np.ndarray:
    """:func:`polytope_radius` for rows of several images at once (``extra = 0``)."""
    b, c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus, ptr = _sources_batch(np.asarray(mu, dtype=np.float64).reshape(b, -1))
    m = q.shape[0]
    marg = np.ascontiguousarray(np.broadcast_to(np.asarray(margin, np.float64), (m,)))
    img = np.ascontiguousarray(img, dtype=np.int64)
    return _radius_rows(q, src, mus, c, h, w, marg, np.zeros(m), iters, ptr, img)


@numba.njit(cache=True)
def _plan_one(g, src, mus, C, H, W, eps, iters, h, arg, nu):
    """A maximiser ``ν`` of ``q^T(µ - ν)`` over the W1 polytope (transport cost <= ε)."""
    p_all = g.size
    for p in range(p_all):
        nu[p] = 0.0
    for s in range(src.size):
        nu[src[s]] += mus[s]
    lip = _grad_absmax(g, C, H, W)
    if eps <= 0.0 or lip == 0.0 or src.size == 0:
        return
    arg_lo = np.empty(p_all, dtype=np.int64)
    arg_hi = np.empty(p_all, dtype=np.int64)
    k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg)
    t_lo = t0
    t_hi = 0.0
    for p in range(p_all):
        arg_lo[p] = arg[p]
        arg_hi[p] = p
    if t0 > eps:
        lo = 0.0
        hi = lip
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            k_val, t_val = _dual_terms(g, mid, src, mus, C, H, W, h, arg)
            if t_val > eps:
                lo = mid
                t_lo = t_val
                for p in range(p_all):
                    arg_lo[p] = arg[p]
            else:
                hi = mid
                t_hi = t_val
                for p in range(p_all):
                    arg_hi[p] = arg[p]
        tau = (eps - t_hi) / (t_lo - t_hi) if t_lo > t_hi else 0.0
        tau = min(max(tau, 0.0), 1.0)
    else:
        tau = 1.0  # θ = 0: the whole plan fits in the budget
    for s in range(src.size):
        p = src[s]
        m_lo = tau * mus[s]
        m_hi = mus[s] - m_lo
        nu[p] -= mus[s]
        nu[arg_lo[p]] += m_lo
        nu[arg_hi[p]] += m_hi


def _plan_rows_impl(q, src, mus, C, H, W, eps, iters):
    m = q.shape[0]
    out = np.empty_like(q)
    for r in numba.prange(m):
        h = np.empty(q.shape[1])
        arg = np.empty(q.shape[1], dtype=np.int64)
        _plan_one(q[r], src, mus, C, H, W, eps[r], iters, h, arg, out[r])
    return out


_plan_rows_par = numba.njit(cache=True, parallel=True)(_plan_rows_impl)


def _plan_rows(q, src, mus, C, H, W, eps, iters):
    return _small_serial(_plan_rows_par, q.shape[0] * q.shape[1], q, src, mus, C, H, W, eps, iters)


def _radius_grad_rows_impl(q, src, mus, C, H, W, margin, extra, iters):
    """Radii as :func:`_radius_rows` plus their gradients (envelope theorem at the best
    ``θ``): ``∂r/∂q = -(µ - ν_θ)/(θ + x)``, ``∂r/∂m = 1/(θ + x)``, ``∂r/∂x = -r/(θ + x)``.
    For ``m <= 0`` the value is ``m/(‖Aᵀq‖_∞ + x)`` (negative) with the ``m`` gradient."""
    m_rows, p_all = q.shape
    rad = np.empty(m_rows)
    gq = np.zeros((m_rows, p_all))
    gm = np.zeros(m_rows)
    gx = np.zeros(m_rows)
    for r in numba.prange(m_rows):
        g = q[r]
        h = np.empty(p_all)
        arg = np.empty(p_all, dtype=np.int64)
        lip = _grad_absmax(g, C, H, W)
        x = extra[r]
        if lip + x <= 0.0:
            rad[r] = np.inf if margin[r] > 0 else 0.0
            continue
        best = margin[r] / (lip + x)
        best_theta = lip
        if margin[r] > 0.0 and src.size > 0:
            k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg)
            if k0 < margin[r] and x <= 0.0:
                rad[r] = np.inf
                continue
            if k0 < margin[r] and (margin[r] - k0) / x > best:
                best = (margin[r] - k0) / x
                best_theta = 0.0
            lo = 0.0
            hi = lip
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                k_val, t_val = _dual_terms(g, mid, src, mus, C, H, W, h, arg)
                psi = (margin[r] - k_val) / (mid + x)
                if psi > best:
                    best = psi
                    best_theta = mid
                if t_val > psi:
                    lo = mid
                else:
                    hi = mid
        rad[r] = best
        den = best_theta + x
        gm[r] = 1.0 / den
        gx[r] = -best / den
        if margin[r] > 0.0 and best_theta < lip and src.size > 0:
            _dual_terms(g, best_theta, src, mus, C, H, W, h, arg)
            for s in range(src.size):
                p = src[s]
                gq[r, p] -= mus[s] / den
                gq[r, arg[p]] += mus[s] / den
    return rad, gq, gm, gx


_radius_grad_par = numba.njit(cache=True, parallel=True)(_radius_grad_rows_impl)


def _radius_grad_rows(q, src, mus, C, H, W, margin, extra, iters):
    return _small_serial(
        _radius_grad_par, q.shape[0] * q.shape[1], q, src, mus, C, H, W, margin, extra, iters
    )


#: Below this much work (rows x pixels of the polytope kernels) a parallel kernel runs on
#: one thread: waking the thread pool costs milliseconds on a busy machine.
PARALLEL_MIN_WORK = 40_000


def _small_serial(kernel, work: int, *args):
    if work >= PARALLEL_MIN_WORK or numba.get_num_threads() == 1:
        return kernel(*args)
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(prev)


def _sources(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src = np.flatnonzero(mu > 0).astype(np.int64)
    return src, np.ascontiguousarray(mu[src], dtype=np.float64)


def _rows(q: np.ndarray, p: int, name: str) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(q, dtype=np.float64))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != p:
        raise ValueError(f"{name}: expected shape (m, {p}), got {q.shape}")
    return q


def _per_row(value, m: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (m,)).copy()
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ValueError(f"{name}: expected finite non-negative values")
    return arr


def polytope_gain(q: np.ndarray, mu: np.ndarray, eps, *, iters: int = THETA_ITERS) -> np.ndarray:
    r"""Sound upper bounds on :math:`\max\{q^T(\mu - \nu) : \nu \ge 0, W_1(\mu, \nu) \le
    \varepsilon\}`, one per row of ``q``.

    Parameters
    ----------
    q : ndarray
        ``(m, C*H*W)`` image-space coefficients, or one row.
    mu : ndarray
        The image ``(C, H, W)``, non-negative (data units).
    eps : float or ndarray
        Budgets ``ε`` (raw W1 units, i.e. flow L1 norm), scalar or ``(m,)``.
    iters : int
        Bisection steps on the dual variable ``θ``.

    Returns
    -------
    ndarray
        ``(m,)``.  Equal (to ``iters`` bisection steps) to the exact maximum, never below
        it; at most ``ε‖Aᵀq‖_∞`` (the L1-ball value).  The polytope minimum of the linear
        function ``qᵀν`` is ``qᵀµ - gain``.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    e = _per_row(eps, q.shape[0], "eps")
    return _gain_rows(q, src, mus, c, h, w, e, iters)


def polytope_radius(
    q: np.ndarray, mu: np.ndarray, margin, *, extra=0.0, iters: int = THETA_ITERS
) -> np.ndarray:
    r"""Largest :math:`\varepsilon` with :math:`\text{gain}_q(\varepsilon) + x\varepsilon \le
    m` (sound: the returned value never exceeds the exact one).

    ``margin`` ``m`` and ``extra`` ``x`` are per row (scalars broadcast).  ``inf`` when
    even moving all mass anywhere cannot use the margin up.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    m = q.shape[0]
    marg = np.broadcast_to(np.asarray(margin, dtype=np.float64), (m,)).copy()
    ext = _per_row(extra, m, "extra")
    return _radius_rows(q, src, mus, c, h, w, marg, ext, iters)


def polytope_plan(q: np.ndarray, mu: np.ndarray, eps, *, iters: int = THETA_ITERS) -> np.ndarray:
    r"""Images :math:`\nu \ge 0` with :math:`W_1(\mu,\nu) \le \varepsilon` (near-)minimising
    :math:`q^T\nu`, one per row: ``(m, C, H, W)``.  Same mass as ``mu``.

    The plan moves the mass of each pixel to the minimiser of the distance transform at
    the optimal ``θ``, mixing the plans on both sides of the kink so that its transport
    cost is at most ``ε``.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    e = _per_row(eps, q.shape[0], "eps")
    return _plan_rows(q, src, mus, c, h, w, e, iters).reshape(-1, c, h, w)


# ================================================================ network representation


def flow_to_image_weights(
    weight: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    r"""Write flow-space rows ``w`` (``(n, C*D)``) as ``Aᵀg + e``: image maps and residuals.

    Every fused first layer has rows :math:`A^T g` (Corollary 2.1); ``g`` is recovered
    by integrating the forward differences (up to a constant per channel, irrelevant
    because flows preserve mass).

    Returns
    -------
    g : ndarray
        ``(n, C*H*W)``.
    resid : ndarray
        ``(n,)``: ``max_j |w - Aᵀg|`` per row plus a rounding allowance, so that
        ``|(w - Aᵀg)ᵀγ| <= resid ‖γ‖₁`` for every flow ``γ``.
    """
    c, h, w = shape
    d = flow_dim(h, w)
    weight = np.asarray(weight, dtype=np.float64)
    n = weight.shape[0]
    if weight.shape[1] != c * d:
        raise ValueError(
            f"weight: expected {c * d} columns for a {shape} image, got {weight.shape}"
        )
    wc = weight.reshape(n, c, d)
    nh = h * (w - 1)
    hflow = wc[..., :nh].reshape(n, c, h, w - 1)
    vflow = wc[..., nh:].reshape(n, c, h - 1, w)
    g = np.zeros((n, c, h, w))
    g[..., 0, 1:] = np.cumsum(hflow[..., 0, :], axis=-1)
    g[..., 1:, :] = g[..., :1, :] + np.cumsum(vflow, axis=-2)
    # the constant per channel is free: take the median (0 outside a convolution's
    # receptive field, so that such rows stay sparse) and drop rounding dust (the
    # residual below accounts for it exactly)
    g -= np.median(g.reshape(n, c, -1), axis=-1)[..., None, None]
    scale = np.abs(g).reshape(n, -1).max(axis=1, initial=0.0)
    g[np.abs(g) <= 1e-13 * scale[:, None, None, None]] = 0.0
    back = apply_flow_adjoint(g).reshape(n, c * d)
    resid = np.abs(weight - back).max(axis=1) if n else np.zeros(0)
    resid = resid + 8 * _EPS64 * (np.abs(weight).max(axis=1) + np.abs(g).reshape(n, -1).max(axis=1))
    return g.reshape(n, c * h * w), resid


class FlowNet:
    r"""A flow-domain ReLU network with its first layer in image space (shared by a batch).

    ``z_0 = (G A + E) diag(inv_scale) δ + b̃`` (``inv_scale`` per channel, applied to the
    channel's flow coordinates) with ``|E_{j,:}| <= resid_j`` entrywise, then
    ``z_k = W_k relu(z_{k-1}) + b_k`` for ``k = 1 .. L-1`` (``W_k`` = ``weights[k-1]``).

    Parameters
    ----------
    first_image : ndarray
        ``G``, ``(n_0, C*H*W)``.
    resid : ndarray
        ``(n_0,)``.
    weights, biases : list of ndarray
        The layers after the first (empty for a linear model).
    shape : tuple
        ``(C, H, W)``.
    device : str or torch.device
        Where the bound propagation runs.
    """

    def __init__(self, first_image, resid, weights, biases, shape, *, device="cpu"):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        kw = {"dtype": torch.float64, "device": self.device}
        self.G = torch.as_tensor(np.asarray(first_image), **kw)
        self.resid = torch.as_tensor(np.asarray(resid), **kw)
        self.weights = [torch.as_tensor(np.asarray(x), **kw) for x in weights]
        self.biases = [torch.as_tensor(np.asarray(x), **kw) for x in biases]
        self.G_np = np.ascontiguousarray(self.G.detach().cpu().numpy())
        self.G_csr = None
        if self.G_np.size and np.count_nonzero(self.G_np) < 0.25 * self.G_np.size:
            import scipy.sparse as sp

            csr = sp.csr_matrix(self.G_np)
            self.G_csr = (csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data)
        self.G_lip = _grad_absmax_t(self.G, self.shape, per_channel=True)  # (n_0, C)
        # float32 copy for the dense intermediate-bound norms (see _lam_g_lip)
        self.G_np32 = None
        self.G_absmax = None
        if self.G_csr is None and self.G_np.size and np.all(np.abs(self.G_np) < _F32_SAFE):
            self.G_np32 = np.ascontiguousarray(self.G_np, dtype=np.float32)
            self.G_absmax = np.abs(self.G_np).max(axis=1)

    @classmethod
    def from_chain(cls, chain, shape, *, scale=1.0, device="cpu") -> FlowNet:
        """From an :class:`~flowverify.verification._chain.AffineChain`; ``scale`` (scalar or
        ``(C,)``) is the chain's input scale, so that ``inv_scale = 1/scale`` reproduces
        ``chain.weights[0]``."""
        c, h, w = shape
        sc = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (c,))
        w0 = np.asarray(chain.weights[0], dtype=np.float64)
        w0 = (w0.reshape(w0.shape[0], c, -1) * sc[None, :, None]).reshape(w0.shape[0], -1)
        g, resid = flow_to_image_weights(w0, shape)
        return cls(g, resid, chain.weights[1:], chain.biases[1:], shape, device=device)

    @property
    def num_relu(self) -> int:
        """Number of ReLU layers (``L - 1``)."""
        return len(self.weights)

    @property
    def relu_dims(self) -> list[int]:
        dims = [self.G.shape[0]] + [w.shape[0] for w in self.weights]
        return dims[:-1]

    @property
    def num_outputs(self) -> int:
        return self.weights[-1].shape[0] if self.weights else self.G.shape[0]


def margin_spec(labels, num_classes: int) -> np.ndarray:
    """``S (N, K-1, K)``: rows ``e_y - e_t`` for ``t != y`` (margins ``f_y - f_t``)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.size
    s = np.zeros((n, num_classes - 1, num_classes))
    others = np.array([[t for t in range(num_classes) if t != y] for y in labels]).reshape(
        n, num_classes - 1
    )
    s[np.arange(n)[:, None], np.arange(num_classes - 1)[None], labels[:, None]] = 1.0
    s[np.arange(n)[:, None], np.arange(num_classes - 1)[None], others] = -1.0
    return s


@dataclass
class Batch:
    """Per-image data of a batch of ``N`` verification problems on one :class:`FlowNet`.

    Attributes
    ----------
    centre : Tensor
        ``(N, n_0)``: the first pre-activation at ``δµ`` (``W̃ δµ + b̃``).
    inv_scale : Tensor
        ``(N, C)``: ``1/s`` of the fused first layer, per channel.
    mu : ndarray
        ``(N, C*H*W)`` float64, the images (data units), clipped at 0.
    spec_w, spec_b : Tensor
        The margin specification folded into the last layer: margins are
        ``spec_w @ relu(z_{L-2}) + spec_b`` (``spec_w @ z_0 + spec_b`` for ``L = 1``),
        ``(N, m, ·)`` and ``(N, m)``.
    """

    centre: torch.Tensor
    inv_scale: torch.Tensor
    mu: np.ndarray
    spec_w: torch.Tensor
    spec_b: torch.Tensor

    @property
    def size(self) -> int:
        return self.centre.shape[0]

    def subset(self, idx) -> Batch:
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.centre.device)
        return Batch(
            self.centre[idx_t],
            self.inv_scale[idx_t],
            self.mu[np.asarray(idx)],
            self.spec_w[idx_t],
            self.spec_b[idx_t],
        )

    @classmethod
    def build(cls, net: FlowNet, centre, inv_scale, mu, labels) -> Batch:
        kw = {"dtype": torch.float64, "device": net.device}
        centre = torch.as_tensor(np.asarray(centre), **kw).reshape(-1, net.G.shape[0])
        n = centre.shape[0]
        c = net.shape[0]
        inv = torch.as_tensor(np.asarray(inv_scale, dtype=np.float64), **kw)
        inv = torch.broadcast_to(inv.reshape(-1, c) if inv.numel() > 1 else inv, (n, c)).clone()
        mu = np.maximum(np.asarray(mu, dtype=np.float64).reshape(n, -1), 0.0)
        spec = torch.as_tensor(margin_spec(labels, net.num_outputs), **kw)
        if net.weights:
            spec_w = spec @ net.weights[-1]
            spec_b = spec @ net.biases[-1]
        else:
            spec_w = spec
            spec_b = torch.zeros(spec.shape[:2], **kw)
        return cls(centre, inv, mu, spec_w, spec_b)


# ============================================================================ CROWN


@numba.njit(cache=True)
def _acc_lip(acc, scale, C, H, W):
    """``max_c scale_c · max |neighbour differences of acc in channel c|``."""
    hw = H * W
    out = 0.0
    for c in range(C):
        base = c * hw
        m = 0.0
        for i in range(H):
            for j in range(W - 1):
                p = base + i * W + j
                d = abs(acc[p + 1] - acc[p])
                if d > m:
                    m = d
        for i in range(H - 1):
            for j in range(W):
                p = base + i * W + j
                d = abs(acc[p + W] - acc[p])
                if d > m:
                    m = d
        if m * scale[c] > out:
            out = m * scale[c]
    return out


def _lam_g_lip_impl(lam, G, err, grow, scale, rows, paired, C, H, W):
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` for the rows with ``rows[b, r]`` (0 elsewhere).

    ``lam (B, m, n_0)`` and ``G`` of one dtype, in which the sums are computed (float64,
    or float32 for speed).  Each result is ``grow`` times the computed norm plus
    ``err[b, r]``: ``1`` and ``0`` in float64; in float32 ``1 + 2u`` and the bound of
    :func:`_f32_dot_error`, which make it a rigorous upper bound of the exact norm (each
    sum is off by at most ``err / 2``, so a neighbour difference by ``err``, and its
    float32 rounding by a factor ``1 + u``).  Zero coefficients are skipped; with
    ``paired``, rows ``r`` and ``r + m/2`` are computed together and a coefficient with
    ``Λ_{r+m/2,k} = -Λ_{r,k}`` (a stable neuron in a lower/upper pair) costs one product
    instead of two.
    """
    nb, m, n0 = lam.shape
    p_all = G.shape[1]
    out = np.zeros((nb, m))
    half = m // 2 if paired else m
    for t in numba.prange(nb * half):
        b = t // half
        r = t % half
        if paired:
            if not (rows[b, r] or rows[b, r + half]):
                continue
            acc = np.zeros(p_all, dtype=G.dtype)
            acc2 = np.zeros(p_all, dtype=G.dtype)
            for k in range(n0):
                a = lam[b, r, k]
                a2 = lam[b, r + half, k]
                if a2 == -a:
                    if a != 0.0:
                        for p in range(p_all):
                            v = a * G[k, p]
                            acc[p] += v
                            acc2[p] -= v
                else:
                    if a != 0.0:
                        for p in range(p_all):
                            acc[p] += a * G[k, p]
                    if a2 != 0.0:
                        for p in range(p_all):
                            acc2[p] += a2 * G[k, p]
            out[b, r] = _acc_lip(acc, scale[b], C, H, W) * grow + err[b, r]
            out[b, r + half] = _acc_lip(acc2, scale[b], C, H, W) * grow + err[b, r + half]
        else:
            if not rows[b, r]:
                continue
            acc = np.zeros(p_all, dtype=G.dtype)
            for k in range(n0):
                a = lam[b, r, k]
                if a != 0.0:
                    for p in range(p_all):
                        acc[p] += a * G[k, p]
            out[b, r] = _acc_lip(acc, scale[b], C, H, W) * grow + err[b, r]
    return out


_lam_g_lip_par = numba.njit(cache=True, parallel=True)(_lam_g_lip_impl)

#: Unit roundoff of float32.
_U32 = 2.0**-24
#: Above these magnitudes (coefficients, or their dot products with ``|G|``) the float32
#: kernel could overflow; the float64 one runs instead.
_F32_SAFE = 1e30


def _f32_dot_error(lam: np.ndarray, g_absmax: np.ndarray, scale: np.ndarray):
    """Twice the largest error of the float32 sums ``Σ_k fl(a_k)·fl(G_kp)``, times the scale.

    Higham's bound for a dot product of length ``n`` whose ``2n`` inputs are rounded to
    float32 first: ``|error| <= γ_{n+2} Σ_k |a_k||G_kp| + (Σ_k |a_k| + Σ_k max|G_k| + n)
    · 2^-147`` (the last term covers subnormal results), with ``γ_n = nu / (1 - nu)`` and
    ``Σ_k |a_k||G_kp| <= Σ_k |a_k| max_p |G_kp|``.  Returns ``(nb, m)`` or ``None`` when
    the magnitudes could overflow float32 (the caller then uses float64).
    """
    n0 = lam.shape[2]
    absl = np.abs(lam)
    s = absl @ g_absmax
    if not (
        np.all(np.isfinite(s))
        and absl.max(initial=0.0) < _F32_SAFE
        and s.max(initial=0.0) < _F32_SAFE
    ):
        return None
    nu = (n0 + 2) * _U32
    gamma = nu / (1.0 - nu)
    tiny = (absl.sum(axis=2) + g_absmax.sum() + n0) * 2.0**-147
    smax = scale.max(axis=1)[:, None]
    return 2.0 * (gamma * s + tiny) * smax * (1.0 + 1e-6)


def _lam_g_lip(lam, G, scale, rows, paired, C, H, W, *, G32=None, g_absmax=None):
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` per row; paired rows with ``G32`` in float32.

    The float32 path (paired rows of intermediate bounds) returns a rigorous
    upper bound of the exact norm (:func:`_lam_g_lip_impl`), so bounds stay sound; its
    excess is at most about ``4 (n_0 + 2) u Σ_k |Λ_k| max|G_k|`` (``u = 2^-24``; 2.4e-5 of
    that sum for 100 neurons).
    """
    work = int(rows.sum()) * G.shape[0] * G.shape[1] // 50
    args = (scale, rows, paired, C, H, W)
    if paired and G32 is not None:
        err = _f32_dot_error(lam, g_absmax, scale)
        if err is not None:
            lam32 = lam.astype(np.float32)
            grow = 1.0 + 2.0 * _U32
            return _small_serial(_lam_g_lip_par, work, lam32, G32, err, grow, *args)
    return _small_serial(_lam_g_lip_par, work, lam, G, np.zeros(lam.shape[:2]), 1.0, *args)


@numba.njit(cache=True, parallel=True)
def _lam_g_lip_csr(lam, indptr, indices, data, p_all, scale, rows, C, H, W):
    """:func:`_lam_g_lip` (unpaired) for a sparse ``G`` in CSR form (convolutions)."""
    nb, m, n0 = lam.shape
    out = np.zeros((nb, m))
    for t in numba.prange(nb * m):
        b = t // m
        r = t % m
        if not rows[b, r]:
            continue
        acc = np.zeros(p_all)
        for k in range(n0):
            a = lam[b, r, k]
            if a != 0.0:
                for z in range(indptr[k], indptr[k + 1]):
                    acc[indices[z]] += a * data[z]
        out[b, r] = _acc_lip(acc, scale[b], C, H, W)
    return out


def _grad_absmax_t(q: torch.Tensor, shape, *, per_channel: bool = False) -> torch.Tensor:
    """``‖Aᵀq‖_∞`` of image-space rows ``q (..., C*H*W)`` -> ``(...)`` or ``(..., C)``."""
    c, h, w = shape
    x = q.reshape(*q.shape[:-1], c, h, w)
    out = torch.zeros((*q.shape[:-1], c), dtype=q.dtype, device=q.device)
    if w > 1:
        out = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=(-2, -1))
    if h > 1:
        out = torch.maximum(out, (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=(-2, -1)))
    return out if per_channel else out.amax(dim=-1)


def _relax(lam, beta, lower, upper, split=None):
    """Replace ``Λ relu(z)`` by a lower bound ``Λ' z + β'`` valid on ``l <= z <= u``.

    ``lam (N, m, n)``, ``lower/upper (N, n)``; ``split (N, n)`` in {-1, 0, +1} fixes
    phases (:func:`_clamp_split`, then an empty interval is closed on the split's side).
    The triangle relaxation is the engine's
    (:class:`~flowverify.verification.engine.activations.LeakyReLUOp` with slope 0).
    """
    from flowverify.verification.engine.activations import (  # the engine imports this module
        LeakyReLUOp,
        apply,
    )

    if split is not None:
        lower, upper = _clamp_split(lower, upper, split)
        upper = torch.where(split > 0, torch.maximum(upper, lower), upper)
        lower = torch.where(split < 0, torch.minimum(lower, upper), lower)
    return apply(lam, beta, LeakyReLUOp(0.0).relax(lower, upper))


def _backward(net: FlowNet, lam, beta, top: int, bounds, splits=None):
    """Propagate ``Λ relu(z_top) + β`` down to a linear function ``Λ z_0 + β``."""
    for j in range(top, -1, -1):
        lo, up = bounds[j]
        lam, beta = _relax(lam, beta, lo, up, None if splits is None else splits[j])
        if j > 0:
            beta = beta + lam @ net.biases[j - 1]
            lam = lam @ net.weights[j - 1]
    return lam, beta


@dataclass
class Linear:
    """Linear lower bounds ``Λ z_0 + β`` of ``m`` quantities per image of a batch.

    Attributes
    ----------
    lam : Tensor
        ``(N, m, n_0)``.
    centre : Tensor
        ``(N, m)``: the value at ``δµ``.
    extra : Tensor
        ``(N, m)``: slope per unit ``ε`` of the residual ``E`` of the first layer.
    inv_scale : Tensor
        ``(N, C)``.
    """

    lam: torch.Tensor
    centre: torch.Tensor
    extra: torch.Tensor
    inv_scale: torch.Tensor

    def q(self, net: FlowNet) -> torch.Tensor:
        """Image-space coefficients ``(N, m, C*H*W)`` of the bounds (``Λ G / s``)."""
        n, m, _ = self.lam.shape
        c = net.shape[0]
        q = (self.lam @ net.G).reshape(n, m, c, -1) * self.inv_scale[:, None, :, None]
        return q.reshape(n, m, -1)


def _linearise(net: FlowNet, batch: Batch, lam, beta) -> Linear:
    centre = torch.einsum("bmn,bn->bm", lam, batch.centre) + beta
    extra = (lam.abs() @ net.resid) * batch.inv_scale.amax(dim=1)[:, None]
    return Linear(lam, centre, extra, batch.inv_scale)


def ball_norm(net: FlowNet, lin: Linear, rows=None, *, paired: bool = False) -> torch.Tensor:
    """``‖ã‖_∞ = ‖Aᵀ q‖_∞ + extra`` per bound ``(N, m)`` (the dual norm of the L1 ball).

    ``rows`` (``(N, m)`` bool) restricts the work (other entries are 0) on the CPU path;
    ``paired``: rows ``r`` and ``r + m/2`` are the lower/upper rows of one neuron.
    """
    if lin.lam.requires_grad or net.device.type != "cpu":
        return _grad_absmax_t(lin.q(net), net.shape) + lin.extra
    n, m, _ = lin.lam.shape
    lam = np.ascontiguousarray(lin.lam.detach().numpy())
    mask = np.ones((n, m), dtype=np.bool_) if rows is None else np.asarray(rows, dtype=np.bool_)
    c, h, w = net.shape
    scale = np.ascontiguousarray(lin.inv_scale.detach().cpu().numpy())
    if net.G_csr is not None:
        indptr, indices, data = net.G_csr
        lip = _small_serial(
            _lam_g_lip_csr,
            int(mask.sum()) * indices.size // 50,
            lam,
            indptr,
            indices,
            data,
            net.G_np.shape[1],
            scale,
            mask,
            c,
            h,
            w,
        )
    else:
        pair = bool(paired and m % 2 == 0)
        lip = _lam_g_lip(
            lam, net.G_np, scale, mask, pair, c, h, w, G32=net.G_np32, g_absmax=net.G_absmax
        )
    return torch.as_tensor(lip) + lin.extra


def _poly_gain(net: FlowNet, batch: Batch, lin: Linear, eps, rows=None) -> torch.Tensor:
    """Polytope gains ``(N, m)`` (numba, per image); ``rows`` (N, m) bool restricts."""
    n, m, _ = lin.lam.shape
    out = np.zeros((n, m))
    eps_np = np.broadcast_to(np.asarray(eps, dtype=np.float64).reshape(-1), (n,))
    c, h, w = net.shape
    for b in range(n):
        sel = np.arange(m) if rows is None else np.flatnonzero(rows[b])
        if sel.size == 0:
            continue
        src, mus = _sources(batch.mu[b])
        qb = (lin.lam[b, torch.as_tensor(sel)].detach() @ net.G).reshape(sel.size, c, -1)
        qb = (qb * lin.inv_scale[b][None, :, None]).reshape(sel.size, -1)
        qb = np.ascontiguousarray(qb.cpu().numpy())
        gain = _gain_rows(qb, src, mus, c, h, w, np.full(sel.size, eps_np[b]), THETA_ITERS)
        out[b, sel] = gain
    return torch.as_tensor(out, device=lin.lam.device)


def _widen(centre, spread) -> torch.Tensor:
    return BOUND_RTOL * (1.0 + centre.abs() + spread.abs())


def _tighten_polytope(net, batch, lin, eps_t, lo, up, n_k):
    """Polytope bounds for the unstable neurons (rows ``[I; -I]`` of ``lin``)."""
    unstable = ((lo < 0) & (up > 0)).detach().cpu().numpy()
    if not unstable.any():
        return lo, up
    rows = np.concatenate([unstable, unstable], axis=1)
    gain = _poly_gain(net, batch, lin, eps_t.detach().cpu().numpy(), rows)
    val = lin.centre - gain - lin.extra * eps_t[:, None]
    val = val - _widen(lin.centre, gain)
    mask = torch.as_tensor(unstable, device=lo.device)
    lo = torch.where(mask, torch.maximum(lo, val[:, :n_k]), lo)
    up = torch.where(mask, torch.minimum(up, -val[:, n_k:]), up)
    return lo, up


def _tighten_first(net: FlowNet, batch: Batch, eps_t, lo, up):
    """Polytope bounds of the unstable first-layer neurons (rows ``±G/s``)."""
    unstable = ((lo < 0) & (up > 0)).cpu().numpy()
    if not unstable.any():
        return lo, up
    c, h, w = net.shape
    lo_np, up_np = lo.cpu().numpy().copy(), up.cpu().numpy().copy()
    centre = batch.centre.cpu().numpy()
    inv = batch.inv_scale.cpu().numpy()
    resid = net.resid.cpu().numpy()
    eps_np = eps_t.cpu().numpy()
    for b in np.flatnonzero(unstable.any(axis=1)):
        sel = np.flatnonzero(unstable[b])
        q = (net.G_np[sel].reshape(sel.size, c, -1) * inv[b][None, :, None]).reshape(sel.size, -1)
        q = np.ascontiguousarray(np.concatenate([q, -q]))
        src, mus = _sources(batch.mu[b])
        gain = _gain_rows(q, src, mus, c, h, w, np.full(q.shape[0], eps_np[b]), THETA_ITERS)
        extra = resid[sel] * inv[b].max() * eps_np[b]
        g_lo, g_up = gain[: sel.size] + extra, gain[sel.size :] + extra
        cen = centre[b, sel]
        tol_lo = BOUND_RTOL * (1.0 + np.abs(cen) + g_lo)
        tol_up = BOUND_RTOL * (1.0 + np.abs(cen) + g_up)
        lo_np[b, sel] = np.maximum(lo_np[b, sel], cen - g_lo - tol_lo)
        up_np[b, sel] = np.minimum(up_np[b, sel], cen + g_up + tol_up)
    return torch.as_tensor(lo_np, device=lo.device), torch.as_tensor(up_np, device=up.device)


def _clamp_split(lo, up, split):
    if split is None:
        return lo, up
    lo = torch.where(split > 0, lo.clamp(min=0), lo)
    up = torch.where(split < 0, up.clamp(max=0), up)
    return lo, up


def _ibp(lo, up, weight, bias):
    a_lo, a_up = lo.clamp(min=0), up.clamp(min=0)
    mid, rad = (a_lo + a_up) / 2, (a_up - a_lo) / 2
    c = mid @ weight.T + bias
    r = rad @ weight.abs().T
    return c - r, c + r


def _as_eps(eps, batch: Batch, device) -> torch.Tensor:
    eps_t = torch.as_tensor(np.asarray(eps, dtype=np.float64), device=device).reshape(-1)
    return eps_t.expand(batch.size).clone() if eps_t.numel() == 1 else eps_t


def layer_bounds_batch(
    net: FlowNet,
    batch: Batch,
    eps,
    *,
    feasible: bool,
    splits=None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds of every ReLU layer for a batch, ``[(lower, upper)]``.

    CROWN layer by layer; neurons that interval arithmetic already proves stable keep
    their interval bounds (their relaxation is exact either way).  ``feasible`` tightens
    every unstable neuron over the polytope.  ``splits``: a list over ReLU layers of
    ``(N, n_j)`` tensors in {-1, 0, 1} (branch and bound).
    """
    eps_t = _as_eps(eps, batch, net.device)
    lip0 = (net.G_lip[None] * batch.inv_scale[:, None, :]).amax(dim=2)
    lip0 = lip0 + net.resid[None] * batch.inv_scale.amax(dim=1)[:, None]
    spread = eps_t[:, None] * lip0
    tol = _widen(batch.centre, spread)
    lo, up = batch.centre - spread - tol, batch.centre + spread + tol
    if feasible and net.G.shape[0]:
        lo, up = _tighten_first(net, batch, eps_t, lo, up)
    lo, up = _clamp_split(lo, up, None if splits is None else splits[0])
    bounds = [(lo, up)]
    for k in range(1, net.num_relu):
        weight, bias = net.weights[k - 1], net.biases[k - 1]
        nk = weight.shape[0]
        split_k = None if splits is None else splits[k]
        ibp_lo, ibp_up = _ibp(*bounds[-1], weight, bias)
        need = (ibp_lo < 0) & (ibp_up > 0)
        if not need.any():  # interval arithmetic proves every neuron stable (e.g. at ε = 0)
            bounds.append(_clamp_split(ibp_lo, ibp_up, split_k))
            continue
        if split_k is not None:
            need = need & (split_k == 0)
        eye = torch.eye(nk, dtype=torch.float64, device=net.device)
        lam = torch.cat([eye, -eye])[None].expand(batch.size, -1, -1)
        beta = lam @ bias
        lam = lam @ weight
        lam, beta = _backward(net, lam, beta, k - 1, bounds, splits)
        lin = _linearise(net, batch, lam, beta)
        rows = torch.cat([need, need], dim=1).detach().cpu().numpy()
        norm = ball_norm(net, lin, rows, paired=True)
        spread = eps_t[:, None] * norm
        val = lin.centre - spread
        val = val - _widen(lin.centre, spread)
        lo = torch.where(need, torch.maximum(val[:, :nk], ibp_lo), ibp_lo)
        up = torch.where(need, torch.minimum(-val[:, nk:], ibp_up), ibp_up)
        if feasible:
            lo, up = _tighten_polytope(net, batch, lin, eps_t, lo, up, nk)
        lo, up = _clamp_split(lo, up, split_k)
        bounds.append((lo, up))
    return bounds


def final_linear(net: FlowNet, batch: Batch, bounds, *, splits=None) -> Linear:
    """Margins ``f_y - f_t >= Λ z_0 + β`` (CROWN through every ReLU layer)."""
    lam = batch.spec_w
    beta = batch.spec_b
    if net.num_relu:
        lam, beta = _backward(net, lam, beta, net.num_relu - 1, bounds, splits)
    return _linearise(net, batch, lam, beta)


def margin_tolerance(centre, spread) -> torch.Tensor:
    """``MARGIN_RTOL * (1 + |c| + ε‖a‖)``: margins must exceed it to count as positive."""
    return MARGIN_RTOL * (1.0 + centre.abs() + spread.abs())


def polytope_radius_batch(net: FlowNet, batch: Batch, lin: Linear, eps) -> torch.Tensor:
    """Per-margin polytope radii ``(N, m)`` (sound; never below the ball's)."""
    n, m, _ = lin.lam.shape
    c, h, w = net.shape
    eps_np = np.broadcast_to(np.asarray(eps, dtype=np.float64).reshape(-1), (n,))
    q_np = lin.q(net).detach().cpu().numpy()
    centre = lin.centre.detach().cpu().numpy()
    extra = lin.extra.detach().cpu().numpy()
    out = np.empty((n, m))
    for b in range(n):
        lip = _grad_absmax_t(torch.as_tensor(q_np[b]), net.shape).numpy()
        spread = (lip + extra[b]) * eps_np[b]
        tol = MARGIN_RTOL * (1.0 + np.abs(centre[b]) + spread)
        src, mus = _sources(batch.mu[b])
        out[b] = _radius_rows(
            np.ascontiguousarray(q_np[b]),
            src,
            mus,
            c,
            h,
            w,
            centre[b] - tol,
            np.ascontiguousarray(extra[b]),
            THETA_ITERS,
        )
    return torch.as_tensor(out, device=lin.lam.device)


# ======================================================================= bound_fn contract

_NET_CACHE: dict[int, tuple[object, FlowNet]] = {}


def _infer_shape(chain, reference: np.ndarray, height, width) -> tuple[int, int, int]:
    p = reference.size
    cd = chain.input_dim
    if height is None or width is None:
        # square grid: C(2H^2 - 2H) = C*D and C H^2 = P  =>  H = 2 / (2 - CD/P)
        ratio = cd / p
        hh = int(round(2.0 / (2.0 - ratio))) if ratio < 2 else 0
        if hh < 2 or p % (hh * hh) or flow_dim(hh, hh) * (p // (hh * hh)) != cd:
            raise ValueError(
                "height, width: cannot infer the image grid from the chain and reference; "
                "pass height= and width="
            )
        height = width = hh
    c = p // (height * width)
    if c * height * width != p or c * flow_dim(height, width) != cd:
        raise ValueError(
            f"height, width: a {height}x{width} grid does not match a reference of {p} "
            f"pixels and a chain input of {cd} flow coordinates"
        )
    return c, int(height), int(width)


def _net_for_chain(chain, shape, device) -> FlowNet:
    key = id(chain)
    hit = _NET_CACHE.get(key)
    if hit is not None and hit[0] is chain and hit[1].shape == shape:
        return hit[1]
    net = FlowNet.from_chain(chain, shape, device=device)
    if len(_NET_CACHE) >= 8:
        _NET_CACHE.pop(next(iter(_NET_CACHE)))
    _NET_CACHE[key] = (chain, net)
    return net


def relu_bounds(
    chain,
    delta_mu: np.ndarray,
    reference: np.ndarray,
    eps: float,
    *,
    feasible: bool = True,
    splits: Sequence[np.ndarray] | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str = "cpu",
) -> list[tuple[np.ndarray, np.ndarray]]:
    r"""Sound pre-activation bounds of every ReLU layer over the verification region.

    The ``bound_fn`` of :func:`flowverify.verification.complete.exact_radius`.  The region is
    :math:`\{\delta : \|\delta - \delta_\mu\|_1 \le \varepsilon\}` (Theorem 3), intersected
    with :math:`\{R + A\delta \ge 0\}` when ``feasible`` (Lemma 5, Theorem 6), and with
    the phase constraints of ``splits``.  CROWN, with every linear bound minimised exactly
    over the region (dual norm on the ball; distance-transform duality on the polytope).

    Parameters
    ----------
    chain : AffineChain
        The flow-domain network (first layer ``W̃ = WA/s``); only its ReLU layers matter,
        so a :meth:`~AffineChain.margin_chain` gives the same bounds.
    delta_mu : ndarray
        ``(C*D,)`` flow of the image, float64.
    reference : ndarray
        ``(C*H*W,)`` (or ``(C, H, W)``) reference ``R`` (data units).
    eps : float
        Radius in flow-L1 (raw W1) units, ``>= 0``.
    feasible : bool
        Intersect with the feasibility polytope ``R + Aδ >= 0``.
    splits : list of ndarray, optional
        One int8 array ``(n_k,)`` per ReLU layer: ``+1`` forces the neuron active
        (``z >= 0``), ``-1`` inactive (``z <= 0``), ``0`` free.  Bounds are valid on the
        sub-domain; a forced phase is relaxed exactly and its bound clamped at 0.
    height, width : int, optional
        The image grid; inferred for square grids.
    device : str
        Torch device of the propagation.

    Returns
    -------
    list of (ndarray, ndarray)
        ``(lower, upper)`` float64 arrays ``(n_k,)`` per ReLU layer (empty for a linear
        model).  If a split makes the sub-domain empty, some ``lower > upper``.
    """
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite radius >= 0, got {eps!r}")
    reference = np.asarray(reference, dtype=np.float64)
    shape = _infer_shape(chain, reference, height, width)
    net = _net_for_chain(chain, shape, device)
    dmu = np.asarray(delta_mu, dtype=np.float64).reshape(-1)
    if dmu.size != chain.input_dim:
        raise ValueError(f"delta_mu: expected {chain.input_dim} flow coordinates, got {dmu.size}")
    centre = np.asarray(chain.weights[0]) @ dmu + np.asarray(chain.biases[0])
    c, h, w = shape
    d = flow_dim(h, w)
    img = reference.reshape(c, h, w) + _divergence_np(dmu.reshape(c, d), h, w)
    batch = Batch.build(net, centre[None], 1.0, img[None], [0])
    sp = None
    if splits is not None:
        if len(splits) != net.num_relu:
            raise ValueError(
                f"splits: expected one array per ReLU layer ({net.num_relu}), got {len(splits)}"
            )
        sp = [torch.as_tensor(np.asarray(s), device=net.device).reshape(1, -1) for s in splits]
    with torch.no_grad():
        bounds = layer_bounds_batch(net, batch, float(eps), feasible=feasible, splits=sp)
    return [(lo[0].cpu().numpy(), up[0].cpu().numpy()) for lo, up in bounds]


def _divergence_np(flow: np.ndarray, h: int, w: int) -> np.ndarray:
    """``A flow`` for ``(C, D)`` flows -> ``(C, H, W)``."""
    from flowverify.transport.flows import apply_flow

    return apply_flow(np.zeros((flow.shape[0], h, w)), flow)


# =========================================================================== radius search


class _PolytopeRadius(torch.autograd.Function):
    """Per-row polytope radii ``(m,)`` of one image, differentiable (envelope theorem)."""

    @staticmethod
    def forward(ctx, q, margin, extra, mu_np, shape):
        c, h, w = shape
        src, mus = _sources(mu_np)
        rad, gq, gm, gx = _radius_grad_rows(
            np.ascontiguousarray(q.detach().cpu().numpy()),
            src,
            mus,
            c,
            h,
            w,
            np.ascontiguousarray(margin.detach().cpu().numpy()),
            np.ascontiguousarray(extra.detach().cpu().numpy()),
            THETA_ITERS,
        )
        dev = q.device
        ctx.save_for_backward(
            torch.as_tensor(gq, device=dev),
            torch.as_tensor(gm, device=dev),
            torch.as_tensor(gx, device=dev),
        )
        return torch.as_tensor(rad, device=dev)

    @staticmethod
    def backward(ctx, grad):
        gq, gm, gx = ctx.saved_tensors
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        return grad[:, None] * gq, grad * gm, grad * gx, None, None


@dataclass
class SearchResult:
    """Outcome of :func:`search_radius` (per image, raw units).

    ``lower``: the largest radius certified (sound); ``upper``: the smallest radius
    probed that the relaxation could not certify (``inf`` if none); ``probes``: oracle
    calls; ``converged``: ``upper <= lower (1 + rtol)`` or the cap was reached.
    """

    lower: np.ndarray
    upper: np.ndarray
    probes: np.ndarray
    converged: np.ndarray


def search_radius(
    oracle,
    e_max: np.ndarray,
    *,
    linear: bool = False,
    rtol: float = 1e-3,
    max_probes: int = 40,
    deadline: float | None = None,
    kappa: float = 0.75,
    lower_init: np.ndarray | None = None,
    clock=None,
) -> SearchResult:
    r"""The largest certified radius of each image, to a relative tolerance ``rtol``.

    A bracketing search on ``ε`` driven by ``F`` (a radius oracle such as
    :class:`~flowverify.verification.engine.EngineProblem`): after each
    probe, ``lower = max(lower, min(ε, F(ε)))`` (sound: the relaxation at ``ε`` certifies
    every smaller radius up to ``F(ε)``) and ``upper = ε`` if ``F(ε) < ε``.  The first
    probe is ``ε = 0`` (the network's linearisation), the next ``κ F(0)``; then the
    fixed point ``F(ε) = ε`` is located by secant steps on ``F(ε) - ε`` (regula falsi
    when bracketed), aimed slightly above the estimate so that a failing probe closes
    the bracket, with a bisection safeguard.  Stops when ``upper <= lower (1 + rtol)``.

    For a linear network (``linear``) ``F`` does not depend on ``ε``: one probe, exact.
    ``e_max`` caps the search (every image of the same mass lies within it).
    ``lower_init`` (per image): a radius already certified (by a cheaper certifier); the
    search starts just above it and never reports less.
    """
    import time as _time

    clock = clock or _time.perf_counter
    e_max = np.asarray(e_max, dtype=np.float64).reshape(-1)
    n = e_max.size
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    probes = np.zeros(n, dtype=np.int64)
    pts: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    e = np.zeros(n)
    if lower_init is not None and not linear:
        lo = np.minimum(np.maximum(np.asarray(lower_init, dtype=np.float64), 0.0), e_max)
        e = np.where(lo > 0, np.minimum(lo * (1 + 2 * rtol), e_max), 0.0)
    active = np.flatnonzero(lo < e_max) if not linear else np.arange(n)
    while active.size:
        f_val = np.asarray(oracle(active, e[active]), dtype=np.float64)
        probes[active] += 1
        ea = e[active]
        if linear:
            lo[active] = np.minimum(np.maximum(f_val, 0.0), e_max[active])
            hi[active] = lo[active]
            break
        cert = f_val >= ea
        lo[active] = np.maximum(lo[active], np.minimum(np.minimum(ea, f_val), e_max[active]))
        hi[active] = np.where(cert, hi[active], np.minimum(hi[active], ea))
        nxt = np.zeros(active.size)
        done = np.zeros(active.size, dtype=bool)
        out_of_time = deadline is not None and clock() >= deadline
        for k, i in enumerate(active):
            pts[i].append((float(ea[k]), float(min(f_val[k], 4 * e_max[i]))))
            if (
                lo[i] >= e_max[i]
                or hi[i] <= lo[i] * (1 + rtol)
                or probes[i] >= max_probes
                or out_of_time
            ):
                done[k] = True
                continue
            nxt[k] = _next_probe(pts[i], lo[i], hi[i], e_max[i], rtol, kappa)
        e[active] = nxt
        active = active[~done]
    converged = (hi <= lo * (1 + rtol)) | (lo >= e_max)
    return SearchResult(lo, hi, probes, converged)


def _next_probe(pts, lo, hi, e_max, rtol, kappa) -> float:
    e2, f2 = pts[-1]
    if e2 == 0.0 and len(pts) == 1:
        est = kappa * f2 if f2 > 0 else e_max
        return float(min(max(est, lo * (1 + rtol)), e_max))
    if len(pts) == 1:  # started from a known radius: a fixed-point step
        est = min(max(f2, lo * (1 + rtol / 4)), 2 * e2)
        if math.isfinite(hi) and not (lo < est < hi):
            est = 0.5 * (lo + hi)
        return float(min(est, e_max))
    phi2 = f2 - e2
    est = None
    for e1, f1 in reversed(pts[:-1]):  # regula falsi with the latest opposite-sign point
        phi1 = f1 - e1
        if (phi1 >= 0) != (phi2 >= 0) and phi1 != phi2:
            est = e2 - phi2 * (e2 - e1) / (phi2 - phi1)
            break
    if est is None and len(pts) >= 2:  # secant through the last two points
        e1, f1 = pts[-2]
        phi1 = f1 - e1
        if phi1 != phi2:
            est = e2 - phi2 * (e2 - e1) / (phi2 - phi1)
            est = min(max(est, e2 / 2), 2 * e2)
    if est is None or not math.isfinite(est):
        est = e2 + phi2 / 2 if math.isfinite(phi2) else 2 * e2
    t = est * (1 + rtol / 3)
    if math.isfinite(hi):
        t = min(t, hi / (1 + rtol / 8))
        if phi2 < 0:
            t = min(t, _bisection_cap(pts, lo, hi))
    t = max(t, lo * (1 + rtol / 4))
    if math.isfinite(hi) and not (lo < t < hi):
        t = 0.5 * (lo + hi)
    return float(min(t, e_max))


def _bisection_cap(pts, lo, hi) -> float:
    """Largest next probe after a failing one: the bracket must shrink geometrically.

    A relaxation that fails at ``ε`` reports ``F(ε) = 0`` (no information), so regula
    falsi anchored at a far failing point creeps towards the fixed point by tiny steps
    (on deep or wide outside networks it ran out of probes at ``lower = 0``).  With no
    certified radius yet the next probe is at most ``hi / 4``; after two failures in a
    row it is at most the bracket's midpoint (an Illinois-type safeguard).
    """
    if lo <= 0.0:
        return hi / 4
    if len(pts) >= 2 and pts[-2][1] < pts[-2][0]:
        return 0.5 * (lo + hi)
    return math.inf
