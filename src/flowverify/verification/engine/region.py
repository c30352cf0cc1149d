r"""The LP of a subdomain on which the network is affine (every unstable neuron split).

Used by :mod:`.bab` where branching can go no further: with the phases of all unstable
neurons fixed, every margin is an affine function of the image on the subdomain, and the
subdomain itself is ``D_ε`` cut by the split constraints ``s_j z_j(ν) >= 0`` (affine too).
One LP per open margin over the flows ``g`` of ``ν = µ + Ag`` (Theorem 6's polytope:
``ν >= 0``, ``‖g‖₁ <= ε``) either finds a misclassified image (a witness, re-checked by the
model) or gives the optimal multipliers ``β`` of the split rows (LP duality), with which the
engine's bound reaches the LP's value.  The LP proposes; only the engine's bound closes.
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from flowverify.verification._exact import _block_incidence

__all__ = ["region_lp"]


def region_lp(bab, sub, root, eps: float, deadline: float | None = None) -> np.ndarray | None:
    """A subdomain where every unstable neuron is split: the network is affine on it,
    and one LP per open margin ``t`` (HiGHS) over flows ``g`` (``ν = µ + Ag``,
    ``ν >= 0`` on the polytope, ``‖g‖₁ <= ε``, the splits ``s_j z_j(ν) >= 0``) gives
    ``min f_y - f_t``.  Negative: the image with the least ``‖g‖₁`` below the margin
    ``-κ`` is returned (re-checked by the model here and by the caller).  Otherwise
    the LP's duals of the split rows become the subdomain's ``β`` for that margin;
    the LP only proposes, the engine's bound decides.  ``deadline``
    (``time.perf_counter()``): no LP starts after it and none runs past it."""
    graph, prob = bab.graph, bab.prob
    if any(i not in bab.relus for i in graph.activations()):
        return None  # not affine on the subdomain
    rel, _, _, signs, empty = bab.relaxations([sub], root, eps)
    if bool(empty[0]):
        return None
    idx = np.zeros(1, dtype=np.int64)
    rels = dict(rel)
    for i in bab.relus:
        shape = graph.nodes[i].shape
        s_lo, _, s_up, b_up = rel[i]
        rels[i] = (s_lo.reshape(1, *shape), None, s_up.reshape(1, *shape), b_up.reshape(1, *shape))
    c, h, w = bab.x.shape[1:]
    amat = _block_incidence(h, w, c)
    n_e = amat.shape[1]
    mu = bab.mu.reshape(-1)
    split_rows, split_rhs, where = [], [], []
    for i in bab.relus:
        node = graph.nodes[i]
        sel = torch.nonzero(signs[i][0]).flatten()
        if sel.numel() == 0:
            continue
        lam = torch.zeros((1, sel.numel(), node.size), dtype=torch.float64, device=prob.device)
        lam[0, torch.arange(sel.numel()), sel] = signs[i][0, sel]
        lin = prob.linear(idx, node.inputs[0], lam.reshape(1, -1, *node.shape), rels)
        q = prob.q(lin).reshape(sel.numel(), -1).cpu().numpy()  # s_j z_j = c + qᵀ(ν - µ)
        split_rows.append(-(sp.csr_matrix(q) @ amat))
        split_rhs.append(lin.centre[0].cpu().numpy())
        where.append((i, sel))
    lin = prob.linear(idx, graph.output, prob.spec[:1], rels)
    q_out = prob.q(lin).reshape(bab.m, -1).cpu().numpy()
    centre = lin.centre[0].cpu().numpy()
    rows = [*split_rows, sp.csr_matrix(np.ones((1, n_e)))]
    rhs = [*split_rhs, [float(eps) * (1 - 1e-9)]]
    if bab.feasible:
        rows.append(-amat)
        rhs.append(mu)
    a_ub = sp.vstack(rows).tocsr()
    a_ub = sp.hstack([a_ub, -a_ub]).tolil()
    n_split = sum(len(r) for r in split_rhs)
    a_ub[n_split, n_e:] = 1.0  # the ‖g‖₁ row: +1 on both halves
    a_ub, b_ub = a_ub.tocsr(), np.concatenate([np.asarray(r, float) for r in rhs])
    # elastic split rows (slack at a large price): feasible even where the splits leave
    # a (numerically) empty region, whose duals then grow to the price
    slack = sp.vstack([-sp.eye(n_split), sp.csr_matrix((a_ub.shape[0] - n_split, n_split))])
    a_el = sp.hstack([a_ub, slack]).tocsr()
    for t in np.flatnonzero(sub.open.cpu().numpy()):
        left = math.inf if deadline is None else deadline - time.perf_counter()
        if left <= 0:
            return None
        opts = {} if deadline is None else {"time_limit": left}
        obj = (sp.csr_matrix(q_out[t][None]) @ amat).toarray()[0]
        price = 1e4 * (1.0 + abs(centre[t]) + np.abs(obj).sum())
        res = linprog(
            np.concatenate([obj, -obj, np.full(n_split, price)]),
            A_ub=a_el,
            b_ub=b_ub,
            method="highs",
            options=opts,
        )
        if res.status != 0:
            continue
        feasible_region = not n_split or res.x[2 * n_e :].max() <= 1e-9
        if feasible_region and centre[t] + obj @ (res.x[:n_e] - res.x[n_e : 2 * n_e]) < 0:
            kappa = 1e-9 * (1.0 + abs(centre[t]))
            rows_t = sp.vstack([a_ub, sp.csr_matrix(np.concatenate([obj, -obj])[None])])
            b_t = np.concatenate([b_ub, [-centre[t] - kappa]])
            near = linprog(np.ones(2 * n_e), A_ub=rows_t, b_ub=b_t, method="highs", options=opts)
            g = near.x if near.status == 0 else res.x[: 2 * n_e]
            nu = np.maximum(mu + amat @ (g[:n_e] - g[n_e:]), 0.0)
            img = (nu * mu.sum() / max(nu.sum(), 1e-300)).reshape(c, h, w)
            if bab.logits(img[None]).argmax() != bab.label:
                return img
            continue
        duals = -np.asarray(res.ineqlin.marginals)[:n_split]
        at = 0
        for i, sel in where:
            k = sel.numel()
            sub.beta[i][t, sel] = torch.as_tensor(
                np.maximum(duals[at : at + k], 0.0), dtype=torch.float64, device=prob.device
            )
            at += k
    return None
