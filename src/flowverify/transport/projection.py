r"""Feasible-point maps onto the attack set of the flow domain (paper section 4).

The attack keeps its iterate in

.. math::

    S = B_\varepsilon(\delta_\mu) \cap \{\delta : R + A\delta \ge 0\}
        \;(\cap \{R + A\delta \le u\}),

a convex polytope that contains :math:`\delta_\mu`.  Writing :math:`\delta = \delta_\mu + w`
(``w`` the *perturbation flow*), ``R + Aδ = µ + Aw``, so in ``w`` the set is

.. math::

    W = \{ w : \|w\|_1 \le \varepsilon,\; 0 \le \mu + Aw \;(\le u) \},

independent of the reference.  By Theorem 1 (:math:`W_1(x, y) = \min \{\|\delta\|_1 :
y = x + A\delta\}`), every image ``µ + Aw`` with ``w ∈ W`` lies in the W1 ball of radius
``ε`` around ``µ``.  The exact (Euclidean or L1) projection onto ``W`` is a quadratic /
linear program.  This module implements a cheap *feasible-point map* instead: given a
feasible anchor ``w0`` (the current iterate) and any candidate ``v``,

1. ``v`` is projected exactly onto the L1 ball (soft thresholding, the threshold found
   by Newton's method, i.e. Michelot's algorithm; no sorting; :func:`project_l1_ball`);
2. the step ``Δ = v - w0`` is made feasible by *flow limiting* (:func:`limit_step`):
   every pixel ``p`` scales all the mass it sends by ``min(1, x_p / out_p)`` (``x`` the
   anchor image, ``out_p`` the mass ``Δ`` takes out of ``p``), and with an upper bound
   every pixel scales all the mass it receives by ``min(1, (u - x_p) / in_p)``; since
   inflows only add and outflows only remove mass, ``0 <= x + AΔ' <= u`` holds for the
   limited step ``Δ'``, whatever the other pixels do;
3. ``w0 + Δ'`` satisfies the pixel constraints; if it leaves the ball it is scaled
   toward ``0`` (``δµ``) by :func:`shrink_to_ball`, which keeps the pixel constraints
   (``µ`` and ``µ + A(w0+Δ')`` both satisfy them, and the set is convex).

:func:`feasible_map` chains the three; :func:`fix_rounding` removes the rounding
violations of a final iterate.  The whole attack step built on this map is
:mod:`flowverify.transport.pgd_step`; the linearised step of the minimal-radius search is
:mod:`flowverify.transport.transport_plans`.

All functions are batched torch operations: flows ``(N, C, D)`` with
``D = H(W-1) + (H-1)W`` in the layout ``concat(h.ravel(), v.ravel())`` of
:mod:`flowverify.transport.grid`, images ``(N, C, H, W)``, radii ``(N,)`` (the L1 norm of
a flow is taken over its channels and coordinates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowverify.transport.grid import divergence, join_flow, split_flow

__all__ = [
    "feasible_map",
    "fix_rounding",
    "inflow",
    "limit_step",
    "outflow",
    "project_l1_ball",
    "shrink_to_ball",
    "source_values",
]


def _flows_by_direction(step: torch.Tensor, height: int, width: int):
    h, v = split_flow(step, height, width)
    return h.clamp(min=0), (-h).clamp(min=0), v.clamp(min=0), (-v).clamp(min=0)


def _out_of(ph, nh, pv, nv):
    """Mass leaving every pixel, from the four parts of :func:`_flows_by_direction`."""
    return F.pad(ph, (0, 1)) + F.pad(nh, (1, 0)) + F.pad(pv, (0, 0, 0, 1)) + F.pad(nv, (0, 0, 1, 0))


def _into(ph, nh, pv, nv):
    """Mass entering every pixel, from the four parts of :func:`_flows_by_direction`."""
    return F.pad(ph, (1, 0)) + F.pad(nh, (0, 1)) + F.pad(pv, (0, 0, 1, 0)) + F.pad(nv, (0, 0, 0, 1))


def outflow(step: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mass ``(..., H, W)`` that the flow ``step`` takes out of every pixel."""
    return _out_of(*_flows_by_direction(step, height, width))


def inflow(step: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mass ``(..., H, W)`` that the flow ``step`` brings into every pixel.

    ``inflow - outflow`` is :func:`flowverify.transport.grid.divergence`.
    """
    return _into(*_flows_by_direction(step, height, width))


def source_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per edge, the value of ``x`` at the pixel a positive (resp. negative) flow leaves.

    Returns two flows ``(..., D)``: for ``h[i, j]`` the values ``x[i, j]`` and
    ``x[i, j+1]``; for ``v[i, j]`` the values ``x[i, j]`` and ``x[i+1, j]``.
    """
    pos = join_flow(x[..., :, :-1], x[..., :-1, :])
    neg = join_flow(x[..., :, 1:], x[..., 1:, :])
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
    out = _out_of(ph, nh, pv, nv)
    s_out = (image.clamp(min=0) / out.clamp(min=tiny)).clamp(max=1)
    if upper is not None:
        inn = _into(ph, nh, pv, nv)
        s_in = ((upper - image).clamp(min=0) / inn.clamp(min=tiny)).clamp(max=1)
        # a positive h flow goes (i, j) -> (i, j+1); a positive v flow (i, j) -> (i+1, j)
        f_ph = s_out[..., :, :-1] * s_in[..., :, 1:]
        f_nh = s_out[..., :, 1:] * s_in[..., :, :-1]
        f_pv = s_out[..., :-1, :] * s_in[..., 1:, :]
        f_nv = s_out[..., 1:, :] * s_in[..., :-1, :]
    else:
        f_ph, f_nh = s_out[..., :, :-1], s_out[..., :, 1:]
        f_pv, f_nv = s_out[..., :-1, :], s_out[..., 1:, :]
    return join_flow(ph * f_ph - nh * f_nh, pv * f_pv - nv * f_nv)


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
