r"""Pre-activation bounds of a fused flow-domain chain, from the bound-propagation engine.

The LP relaxation and the MILP of the exact searches (:mod:`._relaxlp`, :mod:`._milp`,
:mod:`._bab`) work on the chain ``z_1 = W̃δ + b̃``, ``z_{k+1} = W_{k+1} relu(z_k) + b_{k+1}``
of Corollary 2.1, over ``P_ε = {‖δ - δµ‖₁ <= ε, R + Aδ >= 0}`` (Theorem 6; the ball
alone without feasibility, Theorem 3).  Their intermediate bounds come from the engine
(:mod:`.engine`), the one implementation of CROWN, of the relaxations and of the W1
domains: the first layer is written in image space, ``W̃ = GA + E``
(:func:`~.flownet.flow_to_image_weights`, ``|E_{jk}| <= r_j``), so that

.. math::

    z_1(\delta) = G(\nu - \mu) + c_1 + E(\delta - \delta_\mu), \qquad \nu = R + A\delta,

and the engine bounds the image-space network ``ν -> G(ν - µ) + c_1 -> ...`` over the W1
ball or polytope of radius ``ε`` around ``µ = R + Aδµ`` (every ``ν`` of ``P_ε`` lies in
it).  The chain differs from that network by at most ``e_1 = r ε`` (plus the rounding of
``c_1 - Gµ``) at the first layer and ``e_{k+1} = |W_{k+1}| e_k`` above (ReLU is
1-Lipschitz), so each bound is widened by ``e_k``; constraints known on the chain's
values (a node's splits, its parent's bounds) enter the engine widened the other way.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowverify.transport.flows import apply_flow_adjoint
from flowverify.verification.engine.crown import EngineProblem
from flowverify.verification.engine.domains import make_domain
from flowverify.verification.engine.graph import build_graph
from flowverify.verification.flownet import flow_to_image_weights
from flowverify.verification.numerics import _EPS64

__all__ = ["effective", "first_layer_image_form", "lp_image_form", "relu_bounds"]


def effective(lower: np.ndarray, upper: np.ndarray, split: np.ndarray | None):
    """Bounds of one layer after a split (``+1``: ``z >= 0``, ``-1``: ``z <= 0``)."""
    if split is None:
        return lower, upper
    lo = np.where(split > 0, np.maximum(lower, 0.0), lower)
    hi = np.where(split < 0, np.minimum(upper, 0.0), upper)
    return lo, hi


def first_layer_image_form(prob):
    """``(G, E, r)`` of a problem's first layer: ``W̃ = GA + E`` with ``G (n_1, C*H*W)``
    the pixel potentials of its rows, ``E (n_1, C*D)`` the residual and ``r (n_1,)`` a
    bound of ``max_k |E_jk|`` with rounding (cached on ``prob``)."""
    cached = getattr(prob, "_image_form", None)
    if cached is None:
        shape = (prob.channels, prob.height, prob.width)
        g, r = flow_to_image_weights(prob.weights[0], shape)
        back = apply_flow_adjoint(g.reshape(-1, *shape)).reshape(g.shape[0], -1)
        cached = (g, prob.weights[0] - back, r)
        prob._image_form = cached
    return cached


def _engine(prob, feasible: bool) -> tuple[EngineProblem, list[int], np.ndarray]:
    """The engine's problem on the image-space form of ``prob`` (cached), its
    pre-activation nodes in chain order and the first layer's error ``e_1 / ε``."""
    cache = prob.__dict__.setdefault("_engine", {})
    if feasible not in cache:
        g, _, r = first_layer_image_form(prob)
        c, h, w = prob.channels, prob.height, prob.width
        mu = np.maximum(prob.x0, 0.0)
        layers: list[nn.Module] = [nn.Flatten()]
        weights = [g, *prob.weights[1:]]
        biases = [prob.c1 - g @ mu, *prob.biases[1:]]
        for k, (wk, bk) in enumerate(zip(weights, biases, strict=True)):
            lin = nn.Linear(wk.shape[1], wk.shape[0]).double()
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(wk))
                lin.bias.copy_(torch.as_tensor(bk))
            layers += [lin] + ([nn.ReLU()] if k < len(weights) - 1 else [])
        model = nn.Sequential(*layers).eval()
        x = mu.reshape(1, c, h, w)
        graph = build_graph(model, torch.as_tensor(x))
        eng = EngineProblem(
            graph,
            x,
            np.array([prob.label]),
            make_domain("w1-polytope" if feasible else "w1-ball", x),
        )
        # the rounding of c_1 - Gµ (computed once, in float64), and µ's clipping
        n = g.shape[1]
        const = prob.c1_tol + 4 * (n + 2) * _EPS64 * (np.abs(g) @ mu + np.abs(prob.c1))
        const = const + np.abs(g) @ (mu - prob.x0)
        cache[feasible] = (eng, sorted(graph.pre_activations()), r, const)
    return cache[feasible]


def relu_bounds(
    prob,
    eps: float,
    *,
    feasible: bool | None = None,
    splits: list[np.ndarray] | None = None,
    known: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    r"""Sound bounds ``(l_k, u_k)`` of every hidden pre-activation of a chain over ``P_ε``.

    Parameters
    ----------
    prob : Problem
        The chain and the image (:class:`~._relaxlp.Problem`).
    eps : float
        The flow L1 radius (raw units).
    feasible : bool, optional
        The polytope (default: ``prob.feasible``) or the ball.
    splits : list of int8 arrays, optional
        Per hidden layer, ``+1`` / ``-1`` / ``0``: the bounds of the subdomain, clamped by
        its splits.
    known : list of (l, u), optional
        Bounds known to hold on the region (a parent node's); results are intersected
        with them.

    Returns
    -------
    list of (l, u)
        One pair per hidden layer; ``l > u`` somewhere means an empty region.
    """
    feasible = prob.feasible if feasible is None else bool(feasible)
    eng, pre, r, const = _engine(prob, feasible)
    eps = float(eps)
    err = [r * eps + const]
    for wk in prob.weights[1:-1]:
        err.append(np.abs(wk) @ err[-1])
    hints = {}
    for k, node in enumerate(pre):
        lo = np.full(err[k].shape, -np.inf)
        hi = np.full(err[k].shape, np.inf)
        if known is not None:
            lo, hi = np.maximum(lo, known[k][0]), np.minimum(hi, known[k][1])
        if splits is not None:
            lo, hi = effective(lo, hi, splits[k])
        if known is not None or splits is not None:
            hints[node] = tuple(
                torch.as_tensor(v, dtype=torch.float64)[None] for v in (lo - err[k], hi + err[k])
            )
    eps_t = torch.full((1,), eps, dtype=torch.float64)
    with torch.no_grad():
        bounds, _ = eng.layer_bounds(np.zeros(1, dtype=np.int64), eps_t, known=hints)
    out = []
    for k, node in enumerate(pre):
        lo, hi = (t.reshape(-1).numpy() for t in bounds[node])
        lo, hi = lo - err[k], hi + err[k]
        if known is not None:
            lo, hi = np.maximum(lo, known[k][0]), np.minimum(hi, known[k][1])
        out.append(effective(lo, hi, None if splits is None else splits[k]))
    return out


def lp_image_form(prob) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(G, E)`` for the image-space form of a problem's LPs (:class:`~._relaxlp.
    RelaxationLP`): a feasible problem whose first layer has a negligible residual
    (``max |E| <= 1e-9 max(1, max |W̃|)``); ``(None, None)`` selects the flow form."""
    if not prob.feasible:
        return None, None
    g, e, _ = first_layer_image_form(prob)
    w1max = max(1.0, float(np.abs(prob.weights[0]).max(initial=0.0)))
    if e.size and float(np.abs(e).max()) > 1e-9 * w1max:
        return None, None
    return g, e
