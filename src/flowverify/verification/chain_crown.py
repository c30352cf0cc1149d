"""CROWN on a chain of Linear/Conv2d/ReLU layers in the flow domain (the LP and
branch-and-bound certifiers' bounds): intermediate bounds over the L1 ball (Theorem 3)
or the polytope (Theorem 6), the final margins, and :func:`relu_bounds`, the
``bound_fn`` of :func:`~flowverify.verification.complete.exact_radius`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flowverify.transport.flows import apply_flow, flow_dim
from flowverify.verification.ball import _grad_absmax_t
from flowverify.verification.flownet import Batch, FlowNet, Linear, ball_norm
from flowverify.verification.numerics import BOUND_RTOL, MARGIN_RTOL, _widen
from flowverify.verification.polytope import THETA_ITERS, _sources
from flowverify.verification.polytope_kernels import _gain_rows, _radius_rows

__all__ = ["final_linear", "layer_bounds_batch", "polytope_radius_batch", "relu_bounds"]


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


def _linearise(net: FlowNet, batch: Batch, lam, beta) -> Linear:
    centre = torch.einsum("bmn,bn->bm", lam, batch.centre) + beta
    extra = (lam.abs() @ net.resid) * batch.inv_scale.amax(dim=1)[:, None]
    return Linear(lam, centre, extra, batch.inv_scale)


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
    img = apply_flow(reference.reshape(c, h, w), dmu.reshape(c, d))
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
