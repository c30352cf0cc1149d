"""The L1 distance transform of Lemma 5 and the terms of the polytope's Kantorovich dual
(Theorem 6), for one row ``g`` of image-space coefficients: ``h_θ = g □ θd`` (the
inf-convolution ``min_p' g_p' + θ‖p - p'‖₁``, by four sweeps on the row's box),
``K(θ) = Σ_p µ_p (g_p - h_θ(p))`` and the cost ``T(θ)`` of the greedy plan (a subgradient
of ``-K``), and the row's ball dual norm ``‖Aᵀg‖_∞`` and support.  The searches over
``θ`` are in :mod:`.polytope_kernels`.
"""

from __future__ import annotations

import numba
import numpy as np

from flowverify.verification.ball import _acc_lip

__all__: list[str] = []


@numba.njit(cache=True)
def _support(g, C, H, W, i0=0, i1=-1, j0=0, j1=-1):
    """``[i0, i1, j0, j1, max(-g)⁺]``: the rows and columns holding ``g``'s non-zeros (over
    every channel; ``i0 > i1`` if none) and the magnitude of its most negative entry (0
    if none is); ``g`` is zero outside the rows ``i0..i1`` and columns ``j0..j1`` given
    (default: the image)."""
    if i1 < 0:
        i1, j1 = H - 1, W - 1
    out = np.array([H, -1.0, W, -1.0, 0.0])
    for c in range(C):
        for i in range(i0, i1 + 1):
            for j in range(j0, j1 + 1):
                v = g[c * H * W + i * W + j]
                if v != 0.0:
                    out[0] = min(out[0], i)
                    out[1] = max(out[1], i)
                    out[2] = min(out[2], j)
                    out[3] = max(out[3], j)
                    out[4] = max(out[4], -v)
    return out


@numba.njit(cache=True)
def _lip_support(g, C, H, W):
    """``‖Aᵀg‖_∞`` (:func:`~.ball._acc_lip`) and :func:`_support` of a dense row."""
    return _acc_lip(g, np.ones(C), C, H, W), _support(g, C, H, W)


@numba.njit(cache=True)
def _inf_conv(g, theta, C, H, W, h, arg, i0, i1, j0, j1):
    """``h[p] = min_q g[q] + θ‖p - q‖₁`` (per channel) and an argmin ``arg[p]``, with
    ``p`` and ``q`` in the rows ``i0..i1`` and columns ``j0..j1`` (``h`` and ``arg`` are
    not written elsewhere).

    Separable L1 distance transform: forward/backward passes along the rows, then along
    the columns; loops ordered so that the independent lines vectorise (branch-free).
    """
    hw = H * W
    for c in range(C):
        base = c * hw
        for i in range(i0, i1 + 1):
            for j in range(j0, j1 + 1):
                p = base + i * W + j
                h[p] = g[p]
                arg[p] = p
        for j in range(j0 + 1, j1 + 1):
            for i in range(i0, i1 + 1):
                p = base + i * W + j
                v = h[p - 1] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p - 1] if better else arg[p]
        for j in range(j1 - 1, j0 - 1, -1):
            for i in range(i0, i1 + 1):
                p = base + i * W + j
                v = h[p + 1] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p + 1] if better else arg[p]
        for i in range(i0 + 1, i1 + 1):
            r = base + i * W
            for j in range(j0, j1 + 1):
                p = r + j
                v = h[p - W] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p - W] if better else arg[p]
        for i in range(i1 - 1, i0 - 1, -1):
            r = base + i * W
            for j in range(j0, j1 + 1):
                p = r + j
                v = h[p + W] + theta
                better = v < h[p]
                h[p] = v if better else h[p]
                arg[p] = arg[p + W] if better else arg[p]


@numba.njit(cache=True)
def _dual_terms(g, theta, src, mus, C, H, W, h, arg, sup):
    """``K(θ) = Σ_p µ_p (g_p - h_θ(p))`` and the cost ``T(θ)`` of the greedy plan.

    Only pixels within ``R = max(-g)⁺ / θ`` (at least 1) of ``g``'s support box ``sup``
    (:func:`_support`) can have ``h_θ(p) != g(p)``: elsewhere ``g = 0`` and every
    ``g(q) + θ‖p - q‖₁ >= -max(-g)⁺ + θR >= 0``, and the ring of zeros around the support
    stands in for every point beyond it.  So the transform runs on the support box
    grown by ``R``, and a source outside it stays where it is (its terms are exactly 0,
    ``arg[p] = p``).
    """
    i0, i1, j0, j1 = 0, H - 1, 0, W - 1
    if theta > 0.0 and sup[1] >= sup[0] and sup[4] < theta * (H + W):
        r = max(int(np.ceil(sup[4] / theta)), 1)
        i0 = max(int(sup[0]) - r, 0)
        i1 = min(int(sup[1]) + r, H - 1)
        j0 = max(int(sup[2]) - r, 0)
        j1 = min(int(sup[3]) + r, W - 1)
    _inf_conv(g, theta, C, H, W, h, arg, i0, i1, j0, j1)
    hw = H * W
    k_val = 0.0
    t_val = 0.0
    for s in range(src.size):
        p = src[s]
        pp = p % hw
        i = pp // W
        j = pp % W
        if i < i0 or i > i1 or j < j0 or j > j1:
            arg[p] = p
            continue
        q = arg[p]
        k_val += mus[s] * (g[p] - h[p])
        qq = q % hw
        t_val += mus[s] * (abs(i - qq // W) + abs(j - qq % W))
    return k_val, t_val
