"""Numba kernels of the W1 polytope (Lemma 5, Theorem 6), per row: the Kantorovich dual
``min_θ θε + Σ_p µ_p (q_p - (q □ θd)(p))`` by a cutting-plane search on ``θ`` (every
``θ`` a sound bound; evaluations may be kept between calls), its radius form, the
optimal plan's image and the radius gradient, for dense rows or rows on a sparse map.
The distance transform ``q □ θd`` and the dual's terms are in
:mod:`.polytope_transform`.
"""

from __future__ import annotations

import numba
import numpy as np

from flowverify.verification.ball import _acc_lip, _csr_row
from flowverify.verification.numerics import _small_serial
from flowverify.verification.polytope_transform import _dual_terms, _lip_support, _support

#: A row's search without kept evaluations looks for a point left of the optimum at
#: ``θ = lip·D, lip·D², ...`` (``D`` = ``_DESCENT``, at most ``_DESCENT_STEPS`` of them)
#: before ``θ = 0``: the transform runs on the support grown by ``max(-g)/θ``, so the
#: large ``θ`` are the cheap ones, and ``θ = 0`` (the whole image) the dearest.
_DESCENT = 0.5
_DESCENT_STEPS = 6

#: The dual search's optimality tolerance, relative to ``|bound| + ‖Aᵀq‖_∞·ε`` (the ball
#: bound's scale): the default for every bound the certifiers report (re-exported by
#: :mod:`.polytope`; a looser one only where a caller asks, e.g. intermediate bounds).
THETA_TOL = 1e-12


@numba.njit(cache=True)
def _gain_one(g, lip, sup, src, mus, C, H, W, eps, iters, h, arg, planes, same=True, tol=THETA_TOL):
    """Sound upper bound (a dual value) on ``max q^T(µ - ν)`` over the W1 polytope:
    :func:`_dual_search`'s value."""
    args = (g, lip, sup, src, mus, C, H, W, eps, iters, h, arg, planes, same, tol)
    return _dual_search(*args)[0]


@numba.njit(cache=True)
def _dual_search(
    g, lip, sup, src, mus, C, H, W, eps, iters, h, arg, planes, same=True, tol=THETA_TOL
):
    """The dual value of :func:`_gain_one` and the final bracket ``(value, a, b)``: ``a``
    the largest ``θ`` evaluated left of the optimum (``T(a) > ε``; ``-1`` if none: then
    ``b = 0`` is optimal, or ``b = lip``), ``b`` the smallest right of it.

    ``lip = ‖Aᵀg‖_∞``, ``sup``: :func:`_support`.
    ``f(θ) = θε + K(θ)`` is convex and piecewise linear with ``f'(θ) = ε - T(θ)``: a
    bracketed cutting-plane search (Kelley; bisection every third step as a safeguard)
    whose lower model certifies optimality to ``tol`` relative (of ``|f| + lip·ε``; a
    looser ``tol`` stops earlier, a little above the optimum).  Any evaluated ``θ``
    gives a sound bound; the smallest is returned.

    ``planes (S, 3)``: evaluations ``(θ, K(θ), T(θ))`` of this row kept from earlier
    calls (``θ < 0``: empty).  ``K`` and ``T`` do not depend on ``ε``, so each is a
    cutting plane of ``f`` at any ``ε``: the search starts from the tightest bracket
    they give (often already optimal when ``ε`` repeats or moves little, as in a radius
    search), and the planes nearest the new optimum (``S/2`` on each side) are written
    back.  ``same=False``: the planes are of another (e.g. a nearby) row; only their
    ``θ`` nearest the old optimum on each side are used, as the first points to
    evaluate.
    """
    best = lip * eps  # θ = ‖Aᵀg‖_∞: K = 0 (the ball bound)
    if eps <= 0.0 or lip == 0.0 or src.size == 0:
        return best, -1.0, lip
    n_old = planes.shape[0]
    seen = np.empty((n_old + iters + 3 + _DESCENT_STEPS, 3))
    n_seen = 0
    if same:
        for k in range(n_old):
            if planes[k, 0] >= 0.0:
                seen[n_seen] = planes[k]
                n_seen += 1
    elif n_old:
        for k in (0, n_old // 2):
            theta = planes[k, 0]
            if 0.0 <= theta < lip:
                k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup)
                seen[n_seen] = (theta, k_val, t_val)
                n_seen += 1
    a, fa, da = -1.0, 0.0, 0.0
    b, fb, db = lip, lip * eps, eps
    for k in range(n_seen):
        th = seen[k, 0]
        f = th * eps + seen[k, 1]
        d = eps - seen[k, 2]
        best = min(best, f)
        if d < 0.0:
            if th > a:
                a, fa, da = th, f, d
        elif th < b:
            b, fb, db = th, f, d
    if a < 0.0 and b > 0.0:  # a left point: down from the right end, cheap first
        theta = b * _DESCENT
        for _ in range(_DESCENT_STEPS):
            k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup)
            seen[n_seen] = (theta, k_val, t_val)
            n_seen += 1
            f = theta * eps + k_val
            best = min(best, f)
            if t_val > eps:
                a, fa, da = theta, f, eps - t_val
                break
            b, fb, db = theta, f, eps - t_val
            theta *= _DESCENT
    if a < 0.0 and b > 0.0:
        k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg, sup)
        seen[n_seen] = (0.0, k0, t0)
        n_seen += 1
        best = min(best, k0)
        if t0 <= eps:
            b = 0.0
        else:
            a, fa, da = 0.0, k0, eps - t0
    if b > 0.0:
        for it in range(iters):
            theta = (fb - fa + da * a - db * b) / (da - db)
            model = fa + da * (theta - a)  # lower bound on min f (two supporting lines)
            if best - model <= tol * (abs(best) + lip * eps):
                break
            if it % 3 == 2 or not (a < theta < b):
                theta = 0.5 * (a + b)
            k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup)
            seen[n_seen] = (theta, k_val, t_val)
            n_seen += 1
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
    if n_old:
        _keep_planes(seen[:n_seen], eps, planes)
    return best, a, b


@numba.njit(cache=True)
def _keep_planes(seen, eps, planes):
    """Write into ``planes`` the ``S/2`` evaluations of ``seen`` with the largest ``θ``
    below the optimum (``T > ε``) and the ``S/2`` with the smallest above it."""
    half = planes.shape[0] // 2
    planes[:, 0] = -1.0
    order = np.argsort(seen[:, 0])
    n_left = 0
    for k in range(order.size - 1, -1, -1):
        if seen[order[k], 2] > eps and n_left < half:
            planes[n_left] = seen[order[k]]
            n_left += 1
    n_right = 0
    for k in range(order.size):
        if seen[order[k], 2] <= eps and n_right < planes.shape[0] - half:
            planes[half + n_right] = seen[order[k]]
            n_right += 1


@numba.njit(cache=True)
def _radius_one(g, src, mus, C, H, W, margin, extra, iters, h, arg):
    """Largest ``ε`` with ``gain(ε) + extra·ε <= margin`` (a sound lower estimate).

    Every ``θ`` certifies ``ψ(θ) = (margin - K(θ)) / (θ + extra)`` (then ``θε + K(θ) +
    extra·ε <= margin``); ``ψ`` is quasi-concave (a concave numerator over a positive
    linear denominator), increasing where ``T(θ) > ψ(θ)``.  As in :func:`_dual_search`:
    a left point by descent from ``θ = lip`` (``K = 0``: the ball's radius), then cutting
    planes of ``K`` (lines ``K(a) - T(a)(θ - a)``) between the two ends; the model's
    maximum bounds ``ψ`` above, so the search stops within ``1e-12`` of the optimum."""
    if margin <= 0.0:
        return 0.0
    lip, sup = _lip_support(g, C, H, W)
    if lip + extra <= 0.0:
        return np.inf
    best = margin / (lip + extra)
    if src.size == 0:
        return best
    a, ka, ta, pa = -1.0, 0.0, 0.0, -np.inf
    b, kb, tb, pb = lip, 0.0, 0.0, best
    theta = lip * _DESCENT
    for _ in range(_DESCENT_STEPS):
        k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup)
        psi = (margin - k_val) / (theta + extra)
        best = max(best, psi)
        if t_val > psi:
            a, ka, ta, pa = theta, k_val, t_val, psi
            break
        b, kb, tb, pb = theta, k_val, t_val, psi
        theta *= _DESCENT
    if a < 0.0:
        k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg, sup)
        if k0 < margin and extra <= 0.0:
            return np.inf
        p0 = (margin - k0) / extra if extra > 0.0 else -np.inf
        best = max(best, p0)
        if not t0 > p0:  # ψ decreasing from 0: its maximum is there
            return best
        a, ka, ta, pa = 0.0, k0, t0, p0
    for it in range(iters):
        if not ta > tb:
            break
        theta = (ka + ta * a - kb - tb * b) / (ta - tb)
        if a < theta < b:
            model = (margin - (ka - ta * (theta - a))) / (theta + extra)
            if max(pa, pb, model) <= best * (1.0 + 1e-12):
                break
        if it % 3 == 2 or not (a < theta < b):
            theta = 0.5 * (a + b)
        if b - a <= 1e-15 * lip:
            break
        k_val, t_val = _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup)
        psi = (margin - k_val) / (theta + extra)
        best = max(best, psi)
        if t_val > psi:
            a, ka, ta, pa = theta, k_val, t_val, psi
        else:
            b, kb, tb, pb = theta, k_val, t_val, psi
    return best


def _rows_impl(kind, q, src, mus, ptr, img, C, H, W, a, b, iters, planes, same, tol):
    """Row ``r`` of ``q`` on image ``img[r]``, whose sources are ``src[ptr[i]:ptr[i+1]]``:
    ``kind`` 0, its gain at ``ε = a[r]`` (``planes[r]``: see :func:`_gain_one`); 1, its
    radius for the margin ``a[r]`` with the slope ``b[r]`` (:func:`_radius_one`)."""
    m = q.shape[0]
    out = np.empty(m)
    for r in numba.prange(m):
        h = np.empty(q.shape[1])
        arg = np.empty(q.shape[1], dtype=np.int64)
        i = img[r]
        s0, s1 = ptr[i], ptr[i + 1]
        if kind == 0:
            lip, sup = _lip_support(q[r], C, H, W)
            out[r] = _gain_one(
                q[r],
                lip,
                sup,
                src[s0:s1],
                mus[s0:s1],
                C,
                H,
                W,
                a[r],
                iters,
                h,
                arg,
                planes[r],
                same,
                tol,
            )
        else:
            out[r] = _radius_one(q[r], src[s0:s1], mus[s0:s1], C, H, W, a[r], b[r], iters, h, arg)
    return out


_rows_par = numba.njit(cache=True, parallel=True)(_rows_impl)


def _one_image(src, m):
    """``ptr`` and ``img`` for rows that all belong to one image."""
    return np.array([0, src.size], dtype=np.int64), np.zeros(m, dtype=np.int64)


def _rows(kind, q, src, mus, C, H, W, a, b, iters, ptr, img, planes=None, same=True, tol=THETA_TOL):
    if ptr is None:
        ptr, img = _one_image(src, q.shape[0])
    if planes is None:
        planes = np.empty((q.shape[0], 0, 3))
    work = q.shape[0] * q.shape[1]
    args = (kind, q, src, mus, ptr, img, C, H, W, a, b, iters, planes, same, tol)
    return _small_serial(_rows_par, work, *args)


def _gain_rows(
    q, src, mus, C, H, W, eps, iters, ptr=None, img=None, planes=None, same=True, tol=THETA_TOL
):
    """Gains of the rows ``q`` (:func:`_gain_one`), ``ε`` per row; ``planes (m, S, 3)``
    (updated in place) or None, ``same`` and ``tol`` as in :func:`_gain_one`."""
    return _rows(0, q, src, mus, C, H, W, eps, eps, iters, ptr, img, planes, same, tol)


@numba.njit(cache=True, parallel=True)
def _sparse_gain_par(rows, kk, rr, src, mus, ptr, C, H, W, eps, iters, planes, same, tol):
    """:func:`_gain_rows` of the rows ``g_s = (Σ_e vals[b, r, e] G[cols[b, r, e]]) ·
    diag(scale_b)`` at ``(b, r) = (kk[s], rr[s])`` (``rows``: ``vals, cols`` (both may
    broadcast over ``b``), ``G``'s CSR ``indptr, indices, data``, its rows' ``boxes`` and
    ``scale (B, C)``), image ``kk[s]``: each row is built on its window
    (:func:`~.ball._csr_row`), and its norm and support are taken there, so a local row
    (a convolution's) costs its window, not the image."""
    vals, cols, indptr, indices, data, boxes, scale = rows
    m = kk.size
    p_all = C * H * W
    out = np.empty(m)
    for s in numba.prange(m):
        g = np.zeros(p_all)
        h = np.empty(p_all)
        arg = np.empty(p_all, dtype=np.int64)
        b = kk[s]
        i0, i1, j0, j1 = _csr_row(vals, cols, b, rr[s], indptr, indices, data, boxes, g, C, H, W)
        if i1 < 0:
            out[s] = 0.0
            continue
        for c in range(C):
            for i in range(i0, i1 + 1):
                for j in range(j0, j1 + 1):
                    g[c * H * W + i * W + j] *= scale[b, c]
        sup = _support(g, C, H, W, i0, i1, j0, j1)
        lip = _acc_lip(g, np.ones(C), C, H, W, i0, i1, j0, j1)
        s0, s1 = ptr[b], ptr[b + 1]
        out[s] = _gain_one(
            g,
            lip,
            sup,
            src[s0:s1],
            mus[s0:s1],
            C,
            H,
            W,
            eps[s],
            iters,
            h,
            arg,
            planes[s],
            same,
            tol,
        )
    return out


def _sparse_gain_rows(
    rows, kk, rr, src, mus, ptr, C, H, W, eps, iters, planes=None, same=True, tol=THETA_TOL
):
    """Gains of sparse rows (:func:`_sparse_gain_par`); ``planes``, ``same``, ``tol`` as
    in :func:`_gain_one`."""
    if planes is None:
        planes = np.empty((kk.size, 0, 3))
    work = kk.size * rows[0].shape[2] * 50
    args = (rows, kk, rr, src, mus, ptr, C, H, W, eps, iters, planes, same, tol)
    return _small_serial(_sparse_gain_par, work, *args)


def _radius_rows(q, src, mus, C, H, W, margin, extra, iters, ptr=None, img=None):
    """Radii of the rows ``q`` (:func:`_radius_one`), margin and slope per row."""
    return _rows(1, q, src, mus, C, H, W, margin, extra, iters, ptr, img)


@numba.njit(cache=True)
def _plan_one(g, src, mus, C, H, W, eps, iters, h, arg, nu):
    """A maximiser ``ν`` of ``q^T(µ - ν)`` over the W1 polytope (transport cost <= ε).

    The dual's search (:func:`_dual_search`) ends on a bracket ``[a, b]`` whose
    supporting lines meet at the optimum ``θ*``, so ``f`` is linear on ``[a, θ*]`` and on
    ``[θ*, b]``: the greedy plans at ``a`` (cost ``T(a) > ε``) and at ``b`` (``T(b) <=
    ε``; ``b = lip``: nothing moves) are both optimal at ``θ*``, and their mixture of
    cost exactly ``ε`` is an optimal primal.  If ``θ = 0`` is optimal (``T(0) <= ε``),
    the plan at 0 moves all the mass."""
    p_all = g.size
    for p in range(p_all):
        nu[p] = 0.0
    for s in range(src.size):
        nu[src[s]] += mus[s]
    lip, sup = _lip_support(g, C, H, W)
    if eps <= 0.0 or lip == 0.0 or src.size == 0:
        return
    _, a, b = _dual_search(
        g, lip, sup, src, mus, C, H, W, eps, iters, h, arg, np.empty((0, 3)), True
    )
    arg_lo = np.empty(p_all, dtype=np.int64)
    arg_hi = np.empty(p_all, dtype=np.int64)
    for p in range(p_all):
        arg_hi[p] = p
    t_hi = 0.0
    if a < 0.0 and b < lip:  # θ = 0 optimal: the whole plan fits in the budget
        _dual_terms(g, 0.0, src, mus, C, H, W, h, arg, sup)
        for p in range(p_all):
            arg_lo[p] = arg[p]
        tau = 1.0
    elif a < 0.0:  # nothing to move (no left point)
        return
    else:
        _, t_lo = _dual_terms(g, a, src, mus, C, H, W, h, arg, sup)
        for p in range(p_all):
            arg_lo[p] = arg[p]
        if b < lip:
            _, t_hi = _dual_terms(g, b, src, mus, C, H, W, h, arg, sup)
            for p in range(p_all):
                arg_hi[p] = arg[p]
        tau = (eps - t_hi) / (t_lo - t_hi) if t_lo > t_hi else 0.0
        tau = min(max(tau, 0.0), 1.0)
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
        lip, sup = _lip_support(g, C, H, W)
        x = extra[r]
        if lip + x <= 0.0:
            rad[r] = np.inf if margin[r] > 0 else 0.0
            continue
        best = margin[r] / (lip + x)
        best_theta = lip
        if margin[r] > 0.0 and src.size > 0:
            k0, t0 = _dual_terms(g, 0.0, src, mus, C, H, W, h, arg, sup)
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
                k_val, t_val = _dual_terms(g, mid, src, mus, C, H, W, h, arg, sup)
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
            _dual_terms(g, best_theta, src, mus, C, H, W, h, arg, sup)
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
