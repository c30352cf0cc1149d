r"""One projected-gradient step of the attack in the flow domain, compiled on CPU.

The attack maximises a loss of the classifier ``f(µ + Aw)`` over perturbation flows ``w``
in the attack set ``W = {‖w‖₁ <= ε, 0 <= µ + Aw (<= u)}`` of
:mod:`flowverify.transport.projection` (images within W1 distance ``ε`` of ``µ`` by
Theorem 1, :math:`W_1(x, y) = \min\{\|\delta\|_1 : y = x + A\delta\}`).  As for a fused
first layer (Corollary 2.1, ``W̃ = WA``), the gradient with respect to the flow is the
adjoint of the image gradient, ``Aᵀ ∇_x``, so one step needs only the image gradient.

:func:`pgd_step_images` is one whole step: the masked gradient direction, the exact
soft thresholding onto the L1 ball, flow limiting and the radial shrink
(:func:`flowverify.transport.projection.feasible_map`).  On CPU it runs as one numba
kernel per batch in float64 (``cache=True``) that inlines ``Aᵀ`` and ``A``; elsewhere
:func:`_pgd_step_torch` computes the same map with torch operations and
:func:`flowverify.transport.grid.adjoint` / :func:`~flowverify.transport.grid.divergence`.
"""

from __future__ import annotations

import numpy as np
import torch

from flowverify.transport.grid import adjoint, divergence
from flowverify.transport.projection import (
    limit_step,
    project_l1_ball,
    shrink_to_ball,
    source_values,
)

__all__ = ["compiled_available", "pgd_step_images"]


def _jit(func):
    """``numba.njit(cache=True)`` when numba can cache (else without), or None."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    try:
        return numba.njit(cache=True, error_model="numpy")(func)
    except RuntimeError:  # pragma: no cover - no writable cache directory
        return numba.njit(cache=False, error_model="numpy")(func)


def _edge_ends_py(e, nh, wd):
    """The grid cells ``(i, j) -> (i2, j2)`` of flow coordinate ``e`` (the layout of
    :func:`~flowverify.transport.grid.split_flow`: ``nh = H (W - 1)`` horizontal edges,
    row by row, then the vertical ones)."""
    if e < nh:
        i = e // (wd - 1)
        j = e - i * (wd - 1)
        return i, j, i, j + 1
    i = (e - nh) // wd
    j = (e - nh) - i * wd
    return i, j, i + 1, j


_edge_ends = _jit(_edge_ends_py) or _edge_ends_py


def _pgd_step_kernel(w, x, gx, mu, rad, alpha, upper, use_upper, tau, iters, out, xout):  # noqa: C901
    """One masked gradient step + feasible map per image (see :func:`pgd_step_images`).

    ``gx`` is the loss gradient w.r.t. the image (the flow gradient is ``Aᵀ gx``); writes
    the new flows to ``out`` and their images ``mu + A out`` to ``xout``.

    The grid operators are inlined for speed: edge ``e`` runs from pixel ``(i, j)`` to
    ``(i2, j2)`` as column ``e`` of :func:`flowverify.transport.grid.incidence_matrix`;
    step 1 mirrors :func:`flowverify.transport.grid.adjoint` and step 5
    :func:`flowverify.transport.grid.divergence` (compared in ``tests/test_grid.py`` and,
    against :func:`_pgd_step_torch`, in ``tests/test_projection.py``).
    """
    n, c, d = w.shape
    h, wd = x.shape[2], x.shape[3]
    nh = h * (wd - 1)
    outflow_ = np.zeros((h, wd))
    inflow_ = np.zeros((h, wd))
    cand = np.zeros(d)
    for b in range(n):
        # 1. masked descent direction and its Euclidean norm
        sq = 0.0
        for ch in range(c):
            up = upper[b, ch]
            for e in range(d):
                i, j, i2, j2 = _edge_ends(e, nh, wd)
                g = gx[b, ch, i2, j2] - gx[b, ch, i, j]  # (Aᵀ gx)_e, as grid.adjoint
                v = 0.0
                if g < 0:  # positive flow (i, j) -> (i2, j2)
                    if x[b, ch, i, j] > tau and (not use_upper or up - x[b, ch, i2, j2] > tau):
                        v = -g
                elif g > 0:  # negative flow (i2, j2) -> (i, j)
                    if x[b, ch, i2, j2] > tau and (not use_upper or up - x[b, ch, i, j] > tau):
                        v = -g
                out[b, ch, e] = v
                sq += v * v
        scale = alpha[b] / np.sqrt(sq) if sq > 0 else 0.0
        r = rad[b]
        # 2. candidate and soft thresholding (Newton on theta, from 0)
        theta = 0.0
        for _ in range(iters):
            over = 0.0
            cnt = 0
            for ch in range(c):
                for e in range(d):
                    a = abs(w[b, ch, e] + scale * out[b, ch, e]) - theta
                    if a > 0:
                        over += a
                        cnt += 1
            phi = over - r
            if phi <= 0 or cnt == 0:
                break
            theta += phi / cnt
        # 3. step to the soft-thresholded candidate, limited per pixel
        for ch in range(c):
            up = upper[b, ch]
            outflow_[:] = 0.0
            inflow_[:] = 0.0
            for e in range(d):
                v = w[b, ch, e] + scale * out[b, ch, e]
                a = abs(v) - theta
                v = (a if v > 0 else -a) if a > 0 else 0.0
                s = v - w[b, ch, e]
                cand[e] = s
                i, j, i2, j2 = _edge_ends(e, nh, wd)
                if s > 0:
                    outflow_[i, j] += s
                    inflow_[i2, j2] += s
                elif s < 0:
                    outflow_[i2, j2] -= s
                    inflow_[i, j] -= s
            for i in range(h):
                for j in range(wd):
                    o = outflow_[i, j]
                    xv = max(x[b, ch, i, j], 0.0)
                    outflow_[i, j] = min(1.0, xv / o) if o > 0 else 1.0
                    if use_upper:
                        q = inflow_[i, j]
                        room = max(up - x[b, ch, i, j], 0.0)
                        inflow_[i, j] = min(1.0, room / q) if q > 0 else 1.0
                    else:
                        inflow_[i, j] = 1.0
            for e in range(d):
                s = cand[e]
                i, j, i2, j2 = _edge_ends(e, nh, wd)
                if s > 0:
                    s *= outflow_[i, j] * inflow_[i2, j2]
                elif s < 0:
                    s *= outflow_[i2, j2] * inflow_[i, j]
                out[b, ch, e] = w[b, ch, e] + s
        # 4. radial shrink onto the ball
        norm = 0.0
        for ch in range(c):
            for e in range(d):
                norm += abs(out[b, ch, e])
        if norm > r:
            f = r / norm
            for ch in range(c):
                for e in range(d):
                    out[b, ch, e] *= f
        # 5. the new image mu + A out (mirrors grid.divergence)
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    xout[b, ch, i, j] = mu[b, ch, i, j]
            for e in range(d):
                f = out[b, ch, e]
                i, j, i2, j2 = _edge_ends(e, nh, wd)
                xout[b, ch, i, j] -= f
                xout[b, ch, i2, j2] += f


_pgd_step_jit = _jit(_pgd_step_kernel)


def compiled_available() -> bool:
    """Whether the compiled (numba) CPU step is available."""
    return _pgd_step_jit is not None


def pgd_step_images(
    w: torch.Tensor,
    x: torch.Tensor,
    grad_x: torch.Tensor,
    mu: torch.Tensor,
    radius: torch.Tensor,
    alpha: torch.Tensor,
    *,
    upper: torch.Tensor | None = None,
    tau: float = 0.0,
    iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of the attack from the image gradient; returns ``(w', µ + Aw')``.

    The flow gradient is ``Aᵀ grad_x``; the direction is its negative restricted to flows
    whose source holds more than ``tau`` (and whose destination has more than ``tau``
    room below ``upper``), scaled to the Euclidean length ``alpha``; the candidate goes
    through the exact soft thresholding (``iters`` Newton steps), flow limiting and the
    radial shrink (:func:`~.projection.feasible_map`).  On CPU this is one compiled (numba) loop per
    image in float64, without any torch operation (much faster on a busy machine, where
    every multi-threaded torch operation waits for its threads); elsewhere torch
    operations compute the same map.

    Parameters
    ----------
    w : Tensor
        Current perturbation flows ``(n, C, D)``.
    x, grad_x, mu : Tensor
        The current images ``µ + Aw``, the loss gradient w.r.t. them and ``µ``,
        ``(n, C, H, W)``.
    radius, alpha : Tensor
        ``(n,)`` L1 radii and step lengths.
    upper : Tensor, optional
        ``(n, C, 1, 1)`` pixel upper bounds.
    """
    if w.device.type == "cpu" and _pgd_step_jit is not None:
        f64 = torch.float64
        n, c = w.shape[0], w.shape[1]
        up = upper.reshape(n, c) if upper is not None else torch.zeros(n, c)
        out = torch.empty(w.shape, dtype=f64)
        xout = torch.empty(x.shape, dtype=f64)
        _pgd_step_jit(
            w.to(f64).contiguous().numpy(),
            x.to(f64).contiguous().numpy(),
            grad_x.to(f64).contiguous().numpy(),
            mu.to(f64).contiguous().numpy(),
            radius.to(f64).contiguous().numpy(),
            alpha.to(f64).contiguous().numpy(),
            up.to(f64).contiguous().numpy(),
            upper is not None,
            float(tau),
            int(iters),
            out.numpy(),
            xout.numpy(),
        )
        return out.to(w.dtype), xout.to(x.dtype)
    w2 = _pgd_step_torch(w, x, adjoint(grad_x), radius, alpha, upper=upper, tau=tau, iters=iters)
    return w2, mu + divergence(w2, x.shape[-2], x.shape[-1])


def _pgd_step_torch(w, x, grad, radius, alpha, *, upper=None, tau=0.0, iters=4):
    has = torch.sign((x - tau).clamp(min=0))
    ok_pos, ok_neg = source_values(has)  # source of a positive / negative flow
    if upper is not None:
        room = torch.sign((upper - x - tau).clamp(min=0))
        room_left, room_right = source_values(room)
        ok_pos = ok_pos * room_right
        ok_neg = ok_neg * room_left
    d = (-grad).clamp(min=0) * ok_pos - grad.clamp(min=0) * ok_neg
    norm = d.flatten(1).norm(dim=1)
    scale = torch.where(norm > 0, alpha / norm.clamp(min=torch.finfo(d.dtype).tiny), 0.0)
    cand = w + scale[:, None, None] * d
    v = project_l1_ball(cand, radius, iters=iters)
    step = limit_step(x, v - w, upper=upper)
    return shrink_to_ball(w + step, radius)
