r"""Budgeted mass moves: the exact linear step of the minimal-radius attack search.

For a pixel map ``φ`` (the first-order change of the classifier's objective per unit of
mass added at a pixel), a perturbation flow ``w`` changes the objective by ``φᵀAw`` to
first order, and by Theorem 1 (:math:`W_1(x, y) = \min\{\|\delta\|_1 : y = x + A\delta\}`)
its L1 norm bounds the W1 distance it moves the image.  The linearised problem
"largest first-order gain for a W1 budget ``β``",

.. math::

    \max_w \; φ^\top A w \quad \text{s.t.} \quad \|w\|_1 \le β,\;
    0 \le \text{mass taken from } p \le \text{cap}_p ,

is a fractional multiple-choice knapsack over mass moves.  :func:`best_moves` builds its
greedy structure (a :class:`TransportPlan`: for every source, the upper concave hull of
the best gain against the move's length), which solves it for every budget at once;
:func:`realise` turns the greedy solution at a budget into a flow and :func:`route`
routes single moves row first, then column.

All functions are batched torch operations: images ``(B, C, H, W)``, flows ``(B, C, D)``
in the layout of :mod:`flowverify.transport.grid`, budgets ``(B,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowverify.transport.grid import join_flow

__all__ = ["TransportPlan", "best_moves", "realise", "route"]


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
    return join_flow(hflow, vflow)


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
