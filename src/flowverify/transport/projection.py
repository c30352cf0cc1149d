r"""Feasible maps onto the attack set of the flow domain (paper section 4, SPEC section 5).

The attack keeps its iterate in

.. math::

    S = B_\varepsilon(\delta_\mu) \cap \{\delta : R + A\delta \ge 0\}
        \;(\cap \{R + A\delta \le u\}),

a convex polytope that contains :math:`\delta_\mu`.  Writing :math:`\delta = \delta_\mu + w`
(``w`` the *perturbation flow*), ``R + Aδ = µ + Aw``, so in ``w`` the set is

.. math::

    W = \{ w : \|w\|_1 \le \varepsilon,\; 0 \le \mu + Aw \;(\le u) \},

independent of the reference.  The exact (Euclidean or L1) projection onto ``W`` is a
quadratic / linear program.  This module implements a cheap *feasible-point map* instead:
given a feasible anchor ``w0`` (the current iterate) and any candidate ``v``,

1. ``v`` is projected exactly onto the L1 ball (soft thresholding, the threshold found
   by Newton's method, i.e. Michelot's algorithm; no sorting);
2. the step ``Δ = v - w0`` is made feasible by *flow limiting* (:func:`limit_step`):
   every pixel ``p`` scales all the mass it sends by ``min(1, x_p / out_p)`` (``x`` the
   anchor image, ``out_p`` the mass ``Δ`` takes out of ``p``), and with an upper bound
   every pixel scales all the mass it receives by ``min(1, (u - x_p) / in_p)``; since
   inflows only add and outflows only remove mass, ``0 <= x + AΔ' <= u`` holds for the
   limited step ``Δ'``, whatever the other pixels do;
3. ``w0 + Δ'`` satisfies the pixel constraints; if it leaves the ball it is scaled
   toward ``0`` (``δµ``), which keeps the pixel constraints (``µ`` and ``µ + A(w0+Δ')``
   both satisfy them, and the set is convex).

:func:`pgd_step_images` is one whole attack step (masked gradient step + this map), compiled
with numba on CPU.  :func:`best_moves` / :func:`realise` solve the linearised problem
"largest first-order gain for a W1 budget" exactly (a multiple-choice knapsack over mass
moves), the step of the minimal-radius search.

All functions are batched: flows ``(N, C, D)`` with ``D = H(W-1) + (H-1)W`` in the layout
``concat(h.ravel(), v.ravel())`` of :mod:`~.flows`, images ``(N, C, H, W)``, radii
``(N,)`` (the L1 norm of a flow is taken over its channels and coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TransportPlan",
    "adjoint",
    "best_moves",
    "divergence",
    "feasible_map",
    "fix_rounding",
    "limit_step",
    "compiled_available",
    "pgd_step_images",
    "project_l1_ball",
    "realise",
    "route",
    "shrink_to_ball",
]


def _split(flow: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    nh = height * (width - 1)
    lead = flow.shape[:-1]
    return (
        flow[..., :nh].reshape(*lead, height, width - 1),
        flow[..., nh:].reshape(*lead, height - 1, width),
    )


def _join(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([h.flatten(-2), v.flatten(-2)], dim=-1)


def divergence(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``A flow``: the pixel map ``(..., H, W)`` of a flow ``(..., D)`` (mass conserving)."""
    h, v = _split(flow, height, width)
    out = F.pad(h, (1, 0)) - F.pad(h, (0, 1))
    return out + F.pad(v, (0, 0, 1, 0)) - F.pad(v, (0, 0, 0, 1))


def adjoint(g: torch.Tensor) -> torch.Tensor:
    """``Aᵀ g``: the flow ``(..., D)`` of forward differences of a pixel map ``(..., H, W)``."""
    return _join(g[..., :, 1:] - g[..., :, :-1], g[..., 1:, :] - g[..., :-1, :])


def _flows_by_direction(step: torch.Tensor, height: int, width: int):
    h, v = _split(step, height, width)
    return h.clamp(min=0), (-h).clamp(min=0), v.clamp(min=0), (-v).clamp(min=0)


def outflow(step: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mass ``(..., H, W)`` that the flow ``step`` takes out of every pixel."""
    ph, nh, pv, nv = _flows_by_direction(step, height, width)
    return F.pad(ph, (0, 1)) + F.pad(nh, (1, 0)) + F.pad(pv, (0, 0, 0, 1)) + F.pad(nv, (0, 0, 1, 0))


def inflow(step: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mass ``(..., H, W)`` that the flow ``step`` brings into every pixel."""
    ph, nh, pv, nv = _flows_by_direction(step, height, width)
    return F.pad(ph, (1, 0)) + F.pad(nh, (0, 1)) + F.pad(pv, (0, 0, 1, 0)) + F.pad(nv, (0, 0, 0, 1))


def source_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per edge, the value of ``x`` at the pixel a positive (resp. negative) flow leaves.

    Returns two flows ``(..., D)``: for ``h[i, j]`` the values ``x[i, j]`` and
    ``x[i, j+1]``; for ``v[i, j]`` the values ``x[i, j]`` and ``x[i+1, j]``.
    """
    pos = _join(x[..., :, :-1], x[..., :-1, :])
    neg = _join(x[..., :, 1:], x[..., 1:, :])
    return pos, neg


def _edge_factor(
    s_out: torch.Tensor, s_in: torch.Tensor | None, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge factors for positive and negative flows from per-pixel factors."""
    pos, neg = source_values(s_out)
    if s_in is not None:
        in_neg, in_pos = source_values(s_in)  # destination of a positive flow = "neg" side
        pos = pos * in_pos
        neg = neg * in_neg
    return pos, neg


def limit_step(
    image: torch.Tensor, step: torch.Tensor, *, upper: torch.Tensor | float | None = None
) -> torch.Tensor:
    r"""Scale a flow step so that ``image + A step'`` stays in ``[0, upper]``.

    Every pixel ``p`` scales all the mass it sends by ``min(1, x_p / out_p)``; with
    ``upper``, every pixel scales all the mass it receives by ``min(1, (u_p - x_p)/in_p)``.
    An edge's value is multiplied by the factor of its source (and of its destination).
    Then ``x_p - out'_p >= 0`` and ``x_p + in'_p <= u_p`` for every pixel, whatever the
    neighbours do, so ``0 <= x + A step' <= u`` (for ``0 <= x <= u``).  Every coordinate
    of ``step'`` lies between 0 and that of ``step`` (same sign, never larger).

    Parameters
    ----------
    image : Tensor
        The anchor image ``x`` ``(N, C, H, W)``, ``0 <= x (<= upper)``.  Negative
        rounding noise counts as 0 (no mass can leave such a pixel).
    step : Tensor
        A flow step ``(N, C, D)``.
    upper : Tensor or float, optional
        Pixel upper bound, broadcastable to ``image`` (e.g. ``(N, C, 1, 1)``).

    Returns
    -------
    Tensor
        The limited step ``(N, C, D)``.
    """
    height, width = image.shape[-2], image.shape[-1]
    tiny = torch.finfo(step.dtype).tiny
    # Arithmetic only (no torch.where / boolean masks: much faster on CPU).
    ph, nh, pv, nv = _flows_by_direction(step, height, width)
    out = F.pad(ph, (0, 1)) + F.pad(nh, (1, 0)) + F.pad(pv, (0, 0, 0, 1)) + F.pad(nv, (0, 0, 1, 0))
    s_out = (image.clamp(min=0) / out.clamp(min=tiny)).clamp(max=1)
    if upper is not None:
        inn = (
            F.pad(ph, (1, 0))
            + F.pad(nh, (0, 1))
            + F.pad(pv, (0, 0, 1, 0))
            + F.pad(nv, (0, 0, 0, 1))
        )
        s_in = ((upper - image).clamp(min=0) / inn.clamp(min=tiny)).clamp(max=1)
        # a positive h flow goes (i, j) -> (i, j+1); a positive v flow (i, j) -> (i+1, j)
        f_ph = s_out[..., :, :-1] * s_in[..., :, 1:]
        f_nh = s_out[..., :, 1:] * s_in[..., :, :-1]
        f_pv = s_out[..., :-1, :] * s_in[..., 1:, :]
        f_nv = s_out[..., 1:, :] * s_in[..., :-1, :]
    else:
        f_ph, f_nh = s_out[..., :, :-1], s_out[..., :, 1:]
        f_pv, f_nv = s_out[..., :-1, :], s_out[..., 1:, :]
    return _join(ph * f_ph - nh * f_nh, pv * f_pv - nv * f_nv)


def _l1(flow: torch.Tensor) -> torch.Tensor:
    return flow.abs().flatten(1).sum(1)


def project_l1_ball(v: torch.Tensor, radius: torch.Tensor, *, iters: int = 4) -> torch.Tensor:
    r"""Euclidean projection of each ``v[n]`` onto ``{w : ||w||_1 <= radius[n]}`` (soft
    thresholding).

    ``sign(v) max(|v| - θ, 0)`` with ``θ`` the root of the convex, decreasing, piecewise
    linear ``φ(θ) = Σ max(|v| - θ, 0) - r``, found by Newton's method from ``θ = 0``
    (Michelot's algorithm): the iterates increase to the root and reach it in finitely many
    steps (exact once the set of coordinates above ``θ`` stops changing); ``iters`` steps
    are taken (no sorting, which is slow on CPU).  Rows inside the ball get ``θ = 0``
    (unchanged).  Since ``θ`` never exceeds the root, the result may lie slightly outside
    the ball when ``iters`` is too small; :func:`feasible_map` shrinks it.  ``v`` is
    ``(N, ...)``, ``radius`` ``(N,)``.
    """
    n = v.shape[0]
    a = v.abs()
    flat = a.reshape(n, -1)
    theta = torch.zeros(n, 1, dtype=v.dtype, device=v.device)
    for _ in range(iters):
        over = (flat - theta).clamp(min=0)
        phi = over.sum(1, keepdim=True) - radius[:, None]
        count = torch.sign(over).sum(1, keepdim=True).clamp(min=1)
        theta = theta + (phi / count).clamp(min=0)
    shape = (n,) + (1,) * (v.ndim - 1)
    return torch.sign(v) * (a - theta.reshape(shape)).clamp(min=0)


def shrink_to_ball(w: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Scale each ``w[n]`` toward 0 onto ``{||w||_1 <= radius[n]}`` (rows inside unchanged).

    Keeps the pixel constraints of :mod:`this module <flowverify.transport.projection>` (the scaled
    point is a convex combination of ``w[n]`` and 0).
    """
    norm = _l1(w)
    factor = (radius / norm.clamp(min=torch.finfo(w.dtype).tiny)).clamp(max=1)
    return w * factor.reshape(-1, *([1] * (w.ndim - 1)))


def feasible_map(
    anchor: torch.Tensor,
    candidate: torch.Tensor,
    image: torch.Tensor,
    radius: torch.Tensor,
    *,
    upper: torch.Tensor | float | None = None,
) -> torch.Tensor:
    r"""Map a candidate perturbation flow to a point of ``W = {||w||_1 <= r, 0 <= µ+Aw <= u}``.

    Parameters
    ----------
    anchor : Tensor
        A feasible perturbation flow ``w0 (N, C, D)`` (e.g. the current iterate).
    candidate : Tensor
        Any flow ``v (N, C, D)``.
    image : Tensor
        The anchor's image ``µ + A w0`` ``(N, C, H, W)``.
    radius : Tensor
        ``(N,)`` L1 radii, in the units of the flows.
    upper : Tensor or float, optional
        Pixel upper bound ``u`` (broadcastable to ``image``).

    Returns
    -------
    Tensor
        ``shrink(w0 + limit(x, P(v) - w0))`` with ``P`` the Euclidean projection onto the
        L1 ball (see the module docstring).  A point of ``W`` whenever the anchor is
        (exactly so in exact arithmetic; in floating point up to rounding of the image).
    """
    v = project_l1_ball(candidate, radius)
    step = limit_step(image, v - anchor, upper=upper)
    return shrink_to_ball(anchor + step, radius)


def fix_rounding(
    base: torch.Tensor,
    flow: torch.Tensor,
    *,
    upper: torch.Tensor | float | None = None,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Remove rounding violations of ``0 <= base + A flow (<= upper)`` by shrinking flows.

    Meant for float64 tensors.  A pixel with a deficit ``d > 0`` (a tiny negative value)
    scales the mass it sends down by ``d`` (plus a relative margin of ``1e-12`` of its
    outflow); a pixel above ``upper`` scales the mass it receives down likewise.  The
    changes only move flow coordinates toward 0 (``||flow||_1`` never grows), and the image
    keeps its mass exactly (it is ``base + A flow``).  Repeats until no pixel violates
    (the fixes travel along the flow's paths).  Rows still violating after ``max_iter``
    rounds (pathological cycles) are scaled toward 0 by the largest ``t`` in ``[0, 1]``
    keeping ``0 <= base + t A flow (<= upper)``.

    Returns
    -------
    (flow, image) : Tensors
        The corrected flow ``(N, C, D)`` and its image ``base + A flow`` ``(N, C, H, W)``.
    """
    height, width = base.shape[-2], base.shape[-1]
    tiny = torch.finfo(flow.dtype).tiny
    x = base + divergence(flow, height, width)
    for _ in range(max_iter):
        low = x < 0
        high = (x > upper) if upper is not None else torch.zeros_like(low)
        if not bool(low.any() or high.any()):
            return flow, x
        out = outflow(flow, height, width)
        s_out = torch.where(
            low, (1 - (-x + 1e-12 * out) / out.clamp(min=tiny)).clamp(min=0), torch.ones_like(x)
        )
        s_in = None
        if upper is not None:
            inn = inflow(flow, height, width)
            s_in = torch.where(
                high,
                (1 - (x - upper + 1e-12 * inn) / inn.clamp(min=tiny)).clamp(min=0),
                torch.ones_like(x),
            )
        f_pos, f_neg = _edge_factor(s_out, s_in, height, width)
        flow = torch.where(flow > 0, flow * f_pos, flow * f_neg)
        x = base + divergence(flow, height, width)
    # Fallback: scale the violating rows toward 0 (base itself is feasible).
    ax = divergence(flow, height, width)
    t = torch.ones(flow.shape[0], dtype=flow.dtype, device=flow.device)
    for _ in range(60):
        x = base + t.reshape(-1, 1, 1, 1) * ax
        bad = (x < 0).flatten(1).any(1)
        if upper is not None:
            bad = bad | (x > upper).flatten(1).any(1)
        if not bool(bad.any()):
            break
        t = torch.where(bad, t * 0.5, t)
    t = torch.where(bad, torch.zeros_like(t), t)
    flow = flow * t.reshape(-1, *([1] * (flow.ndim - 1)))
    return flow, base + divergence(flow, height, width)


# ----------------------------------------------------------------------------- LMO


def _shift(t: torch.Tensor, di: int, dj: int, fill: float) -> torch.Tensor:
    """``out[..., i, j] = t[..., i + di, j + dj]`` (``fill`` outside the grid)."""
    height, width = t.shape[-2], t.shape[-1]
    pad = (max(-dj, 0), max(dj, 0), max(-di, 0), max(di, 0))
    p = F.pad(t, pad, value=fill)
    i0, j0 = max(di, 0), max(dj, 0)
    return p[..., i0 : i0 + height, j0 : j0 + width]


@dataclass
class TransportPlan:
    """The greedy structure of :func:`best_moves` (see there), sorted per row."""

    slopes: torch.Tensor  # (B, M) gain per unit budget of each item, descending
    widths: torch.Tensor  # (B, M) budget of each item
    order: torch.Tensor  # (B, M) item -> position in (P, K) layout
    hull_k: torch.Tensor  # (B*P, K) distances of the hull vertices (0 = none)
    hull_di: torch.Tensor  # (B*P, K) row offsets of the vertices' destinations
    hull_dj: torch.Tensor  # (B*P, K) column offsets
    cap: torch.Tensor  # (B*P,) mass available at each source
    shape: tuple[int, int, int, int]

    def select(self, rows: torch.Tensor) -> TransportPlan:
        """The plans of the given rows (batch positions)."""
        b, c, h, w = self.shape
        p = c * h * w
        pix = (rows[:, None] * p + torch.arange(p, device=rows.device)[None]).reshape(-1)
        return TransportPlan(
            self.slopes[rows],
            self.widths[rows],
            self.order[rows],
            self.hull_k[pix],
            self.hull_di[pix],
            self.hull_dj[pix],
            self.cap[pix],
            (rows.numel(), c, h, w),
        )

    def budget_for_gain(self, need: torch.Tensor) -> torch.Tensor:
        """Smallest budget whose greedy gain reaches ``need`` (``(B,)``; inf if none)."""
        gain = (self.slopes * self.widths).cumsum(1)
        spent = self.widths.cumsum(1)
        m = gain.shape[1]
        j = torch.searchsorted(gain.contiguous(), need[:, None].contiguous()).squeeze(1)
        full = j >= m
        jc = j.clamp(max=m - 1)
        prev = (jc - 1).clamp(min=0)[:, None]
        g_prev = torch.where(jc > 0, gain.gather(1, prev).squeeze(1), torch.zeros_like(need))
        b_prev = torch.where(jc > 0, spent.gather(1, prev).squeeze(1), torch.zeros_like(need))
        slope = self.slopes.gather(1, jc[:, None]).squeeze(1)
        beta = b_prev + (need - g_prev).clamp(min=0) / slope.clamp(min=torch.finfo(need.dtype).tiny)
        beta = torch.where(full | (slope <= 0), torch.full_like(beta, math.inf), beta)
        return torch.where(need <= 0, torch.zeros_like(beta), beta)

    def gain_at(self, budget: torch.Tensor) -> torch.Tensor:
        """Greedy gain (linearised) of spending ``budget`` (``(B,)``)."""
        taken = self._taken(budget)
        return (taken * self.slopes).sum(1)

    def _taken(self, budget: torch.Tensor) -> torch.Tensor:
        before = self.widths.cumsum(1) - self.widths
        return torch.minimum((budget[:, None] - before).clamp(min=0), self.widths)


def best_moves(
    gain: torch.Tensor,
    cap: torch.Tensor,
    *,
    reach: int,
    room: torch.Tensor | None = None,
) -> TransportPlan:
    r"""Linear maximisation over budgeted mass moves: the greedy structure.

    For a pixel map ``φ = gain`` (the first-order change of an objective per unit of mass
    added at a pixel), the linearised problem

    .. math::

        \max_w \; φ^T A w \quad \text{s.t.} \quad \|w\|_1 \le β,\;
        0 \le \text{mass taken from } p \le \text{cap}_p

    with moves of length at most ``reach`` (L1 distance) is a fractional multiple-choice
    knapsack: moving a unit of mass from ``p`` to ``q`` costs ``d(p, q)`` and gains
    ``φ_q - φ_p``.  For every source ``p`` and distance ``k`` the best destination is the
    maximum of ``φ`` over the L1 ball of radius ``k`` (computed by ``k`` dilations); the
    upper concave hull of ``(k, gain_k)`` gives items of decreasing slope (gain per unit
    budget) and width ``cap_p × Δk``; sorting all items by slope solves the linear problem
    exactly for every budget ``β`` at once (for the given reach, without destination
    limits).  With ``room``, destinations must have ``room > 0``.

    Parameters
    ----------
    gain : Tensor
        ``φ`` ``(B, C, H, W)``.
    cap : Tensor
        Mass available at each source ``(B, C, H, W)`` (the current image).
    reach : int
        Longest move (L1 distance in pixels).
    room : Tensor, optional
        Room below the pixel upper bound ``(B, C, H, W)``.

    Returns
    -------
    TransportPlan
    """
    b, c, h, w = gain.shape
    dtype, device = gain.dtype, gain.device
    neg = -math.inf
    target = gain if room is None else torch.where(room > 0, gain, torch.full_like(gain, neg))
    best = target
    di = torch.zeros(gain.shape, dtype=torch.long, device=device)
    dj = torch.zeros_like(di)
    vals, dis, djs = [], [], []
    for _ in range(reach):
        new_best, new_di, new_dj = best, di, dj
        for si, sj in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            cand = _shift(best, si, sj, neg)
            better = cand > new_best
            new_best = torch.where(better, cand, new_best)
            new_di = torch.where(better, _shift(di, si, sj, 0) + si, new_di)
            new_dj = torch.where(better, _shift(dj, si, sj, 0) + sj, new_dj)
        best, di, dj = new_best, new_di, new_dj
        vals.append(best - gain)
        dis.append(di)
        djs.append(dj)
    p = b * c * h * w
    g = torch.stack(vals, -1).reshape(p, reach)  # best gain within distance k, nondecreasing
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    odi = torch.stack(dis, -1).reshape(p, reach)
    odj = torch.stack(djs, -1).reshape(p, reach)
    dist = (odi.abs() + odj.abs()).to(dtype)  # actual length of the best move within k
    # Upper concave hull of (0, 0), (dist_k, g_k): at most `reach` vertices.
    cur_k = torch.zeros(p, dtype=dtype, device=device)
    cur_g = torch.zeros(p, dtype=dtype, device=device)
    slopes = torch.full((p, reach), neg, dtype=dtype, device=device)
    hull_k = torch.zeros((p, reach), dtype=torch.long, device=device)
    hull_di = torch.zeros((p, reach), dtype=torch.long, device=device)
    hull_dj = torch.zeros((p, reach), dtype=torch.long, device=device)
    alive = torch.ones(p, dtype=torch.bool, device=device)
    for j in range(reach):
        ahead = dist > cur_k[:, None]
        s = (g - cur_g[:, None]) / (dist - cur_k[:, None]).clamp(min=1)
        s = torch.where(ahead, s, torch.full_like(s, neg))
        smax, kk = s.flip(1).max(1)  # the farthest of equal slopes
        kk = reach - 1 - kk
        ok = alive & (smax > 0)
        if not bool(ok.any()):
            break
        slopes[:, j] = torch.where(ok, smax, torch.full_like(smax, neg))
        hull_k[:, j] = torch.where(ok, dist.gather(1, kk[:, None]).squeeze(1).long(), 0)
        hull_di[:, j] = odi.gather(1, kk[:, None]).squeeze(1)
        hull_dj[:, j] = odj.gather(1, kk[:, None]).squeeze(1)
        cur_g = torch.where(ok, g.gather(1, kk[:, None]).squeeze(1), cur_g)
        cur_k = torch.where(ok, dist.gather(1, kk[:, None]).squeeze(1), cur_k)
        alive = ok
    capf = cap.reshape(p).clamp(min=0)
    prev_k = torch.cat([torch.zeros_like(hull_k[:, :1]), hull_k[:, :-1]], 1)
    widths = capf[:, None] * (hull_k - prev_k).clamp(min=0).to(dtype)
    valid = (slopes > 0) & (capf[:, None] > 0) & (hull_k > 0)
    slopes = torch.where(valid, slopes, torch.zeros_like(slopes))
    widths = torch.where(valid, widths, torch.zeros_like(widths))
    s_rows, order = slopes.reshape(b, -1).sort(1, descending=True)
    w_rows = widths.reshape(b, -1).gather(1, order)
    return TransportPlan(s_rows, w_rows, order, hull_k, hull_di, hull_dj, capf, (b, c, h, w))


def route(amount: torch.Tensor, di: torch.Tensor, dj: torch.Tensor) -> torch.Tensor:
    """The flow moving ``amount[p]`` from ``p`` to ``p + (di, dj)``, row first, then column.

    ``amount``, ``di``, ``dj``: ``(B, C, H, W)``; the destinations must be on the grid.
    Returns flows ``(B, C, D)``; ``||flow||_1 <= Σ amount |di| + |dj|``.
    """
    b, c, h, w = amount.shape
    device = amount.device
    ii = torch.arange(h, device=device).reshape(1, 1, h, 1).expand(b, c, h, w)
    jj = torch.arange(w, device=device).reshape(1, 1, 1, w).expand(b, c, h, w)
    j2 = jj + dj
    dh = torch.zeros(b, c, h, w + 1, dtype=amount.dtype, device=device)
    sg = torch.sign(dj).to(amount.dtype) * amount
    dh.scatter_add_(3, torch.minimum(jj, j2), sg)
    dh.scatter_add_(3, torch.maximum(jj, j2), -sg)
    hflow = dh.cumsum(3)[..., : w - 1]
    i2 = ii + di
    dv = torch.zeros(b, c, (h + 1) * w, dtype=amount.dtype, device=device)
    sg = (torch.sign(di).to(amount.dtype) * amount).reshape(b, c, -1)
    dv.scatter_add_(2, (torch.minimum(ii, i2) * w + j2).reshape(b, c, -1), sg)
    dv.scatter_add_(2, (torch.maximum(ii, i2) * w + j2).reshape(b, c, -1), -sg)
    vflow = dv.reshape(b, c, h + 1, w).cumsum(2)[..., : h - 1, :]
    return _join(hflow, vflow)


def realise(plan: TransportPlan, budget: torch.Tensor, *, room: torch.Tensor | None = None):
    """The flow of the greedy solution of ``plan`` at ``budget`` (``(B,)``).

    Each source sends its mass to at most two destinations (two consecutive hull
    vertices); mass leaving ``p`` never exceeds ``cap_p``; with ``room`` the mass sent to
    an over-subscribed destination is scaled down so that it receives at most its room.
    Returns the flow ``(B, C, D)``.
    """
    b, c, h, w = plan.shape
    p = c * h * w
    k = plan.hull_k.shape[1]
    taken = plan._taken(budget)
    per_item = torch.zeros_like(taken).scatter(1, plan.order, taken).reshape(b * p, k)
    spent = per_item.sum(1)
    cap = plan.cap
    level = spent / cap.clamp(min=torch.finfo(cap.dtype).tiny)  # mean distance per unit
    hk = plan.hull_k.to(level.dtype)
    exists = plan.hull_k > 0
    n_full = ((hk <= level[:, None] * (1 + 1e-9)) & exists).sum(1)
    n_vert = exists.sum(1)
    last = (n_full - 1).clamp(min=0)[:, None]
    nxt = n_full.clamp(max=k - 1)[:, None]
    k_prev = torch.where(n_full > 0, hk.gather(1, last).squeeze(1), torch.zeros_like(level))
    k_next = hk.gather(1, nxt).squeeze(1)
    has_next = n_full < n_vert
    frac = (level - k_prev) / (k_next - k_prev).clamp(min=1)
    frac = torch.where(has_next, frac.clamp(0, 1), torch.zeros_like(level))
    m_next = torch.where((spent > 0) & has_next, frac * cap, torch.zeros_like(level))
    m_prev = torch.where((spent > 0) & (n_full > 0), cap - m_next, torch.zeros_like(level))
    moves = [
        (m_prev, plan.hull_di.gather(1, last).squeeze(1), plan.hull_dj.gather(1, last).squeeze(1)),
        (m_next, plan.hull_di.gather(1, nxt).squeeze(1), plan.hull_dj.gather(1, nxt).squeeze(1)),
    ]
    shape = (b, c, h, w)
    if room is not None:  # scale the sources of over-subscribed destinations
        pix = torch.arange(p, device=cap.device).repeat(b)
        ch, rest = pix // (h * w), pix % (h * w)
        inflow_ = torch.zeros(b * p, dtype=cap.dtype, device=cap.device)
        dests = []
        for amt, mdi, mdj in moves:
            dest = (
                torch.arange(b, device=cap.device).repeat_interleave(p) * p
                + ch * h * w
                + (rest // w + mdi) * w
                + (rest % w + mdj)
            )
            dests.append(dest)
            inflow_.scatter_add_(0, dest, amt)
        r = room.reshape(-1)
        factor = torch.where(
            inflow_ > r, r / inflow_.clamp(min=torch.finfo(r.dtype).tiny), torch.ones_like(r)
        )
        moves = [
            (amt * factor[d], mdi, mdj) for (amt, mdi, mdj), d in zip(moves, dests, strict=True)
        ]
    flow = None
    for amt, mdi, mdj in moves:
        f = route(amt.reshape(shape), mdi.reshape(shape), mdj.reshape(shape))
        flow = f if flow is None else flow + f
    return flow


# ----------------------------------------------------------------------------- CPU kernel


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


def _pgd_step_kernel(w, x, gx, mu, rad, alpha, upper, use_upper, tau, iters, out, xout):  # noqa: C901
    """One masked gradient step + feasible map per image (see :func:`pgd_step_images`).

    ``gx`` is the loss gradient w.r.t. the image (the flow gradient is ``Aᵀ gx``); writes
    the new flows to ``out`` and their images ``mu + A out`` to ``xout``.
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
                if e < nh:
                    i = e // (wd - 1)
                    j = e - i * (wd - 1)
                    i2, j2 = i, j + 1
                else:
                    i = (e - nh) // wd
                    j = (e - nh) - i * wd
                    i2, j2 = i + 1, j
                g = gx[b, ch, i2, j2] - gx[b, ch, i, j]  # (Aᵀ gx)_e
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
                if e < nh:
                    i = e // (wd - 1)
                    j = e - i * (wd - 1)
                    i2, j2 = i, j + 1
                else:
                    i = (e - nh) // wd
                    j = (e - nh) - i * wd
                    i2, j2 = i + 1, j
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
                if e < nh:
                    i = e // (wd - 1)
                    j = e - i * (wd - 1)
                    i2, j2 = i, j + 1
                else:
                    i = (e - nh) // wd
                    j = (e - nh) - i * wd
                    i2, j2 = i + 1, j
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
        # 5. the new image mu + A out
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    xout[b, ch, i, j] = mu[b, ch, i, j]
            for e in range(d):
                f = out[b, ch, e]
                if e < nh:
                    i = e // (wd - 1)
                    j = e - i * (wd - 1)
                    i2, j2 = i, j + 1
                else:
                    i = (e - nh) // wd
                    j = (e - nh) - i * wd
                    i2, j2 = i + 1, j
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
    radial shrink (:func:`feasible_map`).  On CPU this is one compiled (numba) loop per
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
