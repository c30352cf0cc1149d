r"""The LP of a subdomain on which the network is affine (every unstable neuron split).

Used by :mod:`.bab` where branching can go no further: with the phases of all unstable
neurons fixed, every margin is an affine function of the image on the subdomain, and the
subdomain itself is ``D_ε`` cut by the split constraints ``s_j z_j(ν) >= 0`` (affine too).
One LP per open margin over the flows ``g`` of ``ν = µ + Ag`` (Theorem 6's polytope:
``ν >= 0``, ``‖g‖₁ <= ε``) either finds a misclassified image (a witness, re-checked by the
model) or gives the optimal multipliers ``β`` of the split rows (LP duality), with which the
engine's bound reaches the LP's value.  The LP proposes; only the engine's bound closes.

The same LP polishes an adversarial image (:func:`polish`): on the linear region of a
witness (every ReLU fixed to its phase there) the closest image still classified as the
witness's class is an LP (W1 = the least ``‖g‖₁``, SPEC's flow form); the constraints of
neurons that end on their boundary are flipped and the LP solved again, a local search
over linear regions in which each step is exact on its region (the W1 never grows).
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

from flowverify.transport.flows import w1_distance
from flowverify.verification._exact import _block_incidence
from flowverify.verification.engine import subdomain as _subdomain

__all__ = ["polish", "region_lp"]


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
    dev = prob.device
    if any(i not in bab.relus for i in graph.activations()):
        return None  # not affine on the subdomain
    rel, _, _, signs, empty = bab.relaxations([sub], root, eps)
    if bool(empty[0]):
        return None
    rels = dict(rel)
    for i in bab.relus:
        shape = graph.nodes[i].shape
        s_lo, _, s_up, b_up = rel[i]
        rels[i] = (s_lo.reshape(1, *shape), None, s_up.reshape(1, *shape), b_up.reshape(1, *shape))
    amat = _incidence(bab)
    n_e = amat.shape[1]
    mu = bab.mu.reshape(-1)
    split_rows, split_rhs, where = _split_rows(bab, rels, {i: signs[i][0] for i in bab.relus}, amat)
    q_out, centre = _margin_rows(bab, rels)
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
            near, img = _nearest(rows_t, b_t, amat, mu, bab.x.shape[1:], deadline)
            if near is None:  # the margin's own minimiser then
                img = _image(res.x[: 2 * n_e], amat, mu, bab.x.shape[1:])
            if bab.logits(img[None]).argmax() != bab.label:
                return img
            continue
        duals = -np.asarray(res.ineqlin.marginals)[:n_split]
        at = 0
        for i, sel in where:
            k = sel.numel()
            beta = torch.zeros((bab.m, graph.nodes[i].size), dtype=torch.float64, device=dev)
            _subdomain.unpack(sub.beta[i], beta)
            beta[t, sel] = torch.as_tensor(np.maximum(duals[at : at + k], 0.0)).to(beta)
            sub.beta[i] = _subdomain.pack(beta, signs[i][0] != 0)
            at += k
    return None


def _incidence(bab) -> sp.csr_matrix:
    c, h, w = bab.x.shape[1:]
    return _block_incidence(h, w, c)


def _split_rows(bab, rels: dict, signs: dict, amat):
    """The rows ``-s_j q_jᵀA`` and right-hand sides ``c_j`` of the constraints ``s_j z_j(ν)
    >= 0`` (``s_j z_j = c_j + q_jᵀ(ν - µ)`` through the affine ``rels``) over the flows
    ``g`` (``ν = µ + Ag``, ``A = amat``), for the neurons with ``signs[i] != 0``; and
    ``(i, sel)`` per block."""
    graph, prob = bab.graph, bab.prob
    idx = np.zeros(1, dtype=np.int64)
    rows, rhs, where = [], [], []
    for i in bab.relus:
        node = graph.nodes[i]
        sel = torch.nonzero(signs[i]).flatten()
        if sel.numel() == 0:
            continue
        lam = torch.zeros((1, sel.numel(), node.size), dtype=torch.float64, device=prob.device)
        lam[0, torch.arange(sel.numel()), sel] = signs[i][sel].to(torch.float64)
        lin = prob.linear(idx, node.inputs[0], lam.reshape(1, -1, *node.shape), rels)
        q = prob.q(lin).reshape(sel.numel(), -1).cpu().numpy()  # s_j z_j = c + qᵀ(ν - µ)
        rows.append(-(sp.csr_matrix(q) @ amat))
        rhs.append(lin.centre[0].cpu().numpy())
        where.append((i, sel))
    return rows, rhs, where


def _margin_rows(bab, rels: dict):
    """Image-space rows ``(m, C*H*W)`` and values at ``µ`` of the margins through ``rels``."""
    prob = bab.prob
    lin = prob.linear(np.zeros(1, dtype=np.int64), bab.graph.output, prob.spec[:1], rels)
    return prob.q(lin).reshape(bab.m, -1).cpu().numpy(), lin.centre[0].cpu().numpy()


def polish(bab, witness: np.ndarray, *, rounds: int = 4, deadline: float | None = None, check=None):
    """A closer adversarial image than ``witness`` (``(C, H, W)``, misclassified) and
    its exact W1 (raw), or ``None``.

    The least ``‖g‖₁`` (``ν = µ + Ag``, ``ν >= 0`` on the polytope) on the witness's
    linear region (every ReLU ``s_j z_j(ν) >= 0`` in its phase there, the network there
    affine through each neuron's own relaxation on that side) with the margin of its
    class below ``-κ``; then again with the neurons whose constraints bind flipped (the
    last image lies on both sides), for ``rounds`` LPs or until one gains nothing: the
    image returned has a smaller exact W1 than the witness and passes ``check`` (image
    -> misclassified; default the float64 model's logits).  An image the LP puts within
    rounding of the decision boundary is solved for again with the margin's clearance
    ``κ`` 10 to 100 times larger (up to ``1e-4 (1 + |c|)``)."""
    graph = bab.graph
    if any(i not in bab.relus for i in graph.activations()):
        return None  # not piecewise linear
    img = np.asarray(witness, dtype=np.float64)
    amat = _incidence(bab)
    mu = bab.mu.reshape(-1)
    model_in = torch.as_tensor(img[None], dtype=torch.float64, device=bab.prob.device)
    vals = graph.values(bab.prob._model_input(model_in, [0]))
    signs = {
        i: torch.where(vals[graph.nodes[i].inputs[0]].reshape(-1) >= 0, 1, -1).to(torch.int8)
        for i in bab.relus
    }
    if check is None:
        check = lambda image: bab.logits(image[None]).argmax() != bab.label  # noqa: E731
    best, best_w1 = None, float(w1_distance(img, bab.x[0], unit="raw"))
    for _ in range(rounds):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        rels = {}
        for i in bab.relus:  # each neuron's own linear piece: its relaxation on one side
            up = (signs[i] > 0).to(torch.float64).to(bab.prob.device)
            lo, up = (up - 1.0)[None], up[None]  # [0, 1] active, [-1, 0] inactive
            s_lo, _, s_up, b_up = graph.nodes[i].op.relax(lo, up)
            shape = (1, *graph.nodes[i].shape)
            rels[i] = (s_lo.reshape(shape), None, s_up.reshape(shape), b_up.reshape(shape))
        rows, rhs, where = _split_rows(bab, rels, signs, amat)
        q_out, centre = _margin_rows(bab, rels)
        margins = centre + q_out @ (img.reshape(-1) - mu)
        t = int(np.argmin(margins))
        obj_t = (sp.csr_matrix(q_out[t][None]) @ amat).toarray()[0]
        blocks = [*rows, sp.csr_matrix(obj_t[None]), *([-amat] if bab.feasible else [])]
        a_g = sp.vstack(blocks).tocsr()
        a_g = sp.hstack([a_g, -a_g]).tocsr()
        for kappa in (1e-9, 1e-7, 1e-6, 1e-5, 1e-4):  # the margin's clearance, relative
            clear = [-centre[t] - kappa * (1.0 + abs(centre[t]))]
            b_ub = np.concatenate([*rhs, clear, *([mu] if bab.feasible else [])])
            res, cand = _nearest(a_g, b_ub, amat, mu, img.shape, deadline)
            if res is None or check(cand):
                break
        if res is None or not check(cand):
            break
        w1 = float(w1_distance(cand, bab.x[0], unit="raw"))
        if not w1 < best_w1 * (1 - 1e-12):
            break
        best, best_w1, img = (cand, w1), w1, cand
        duals = np.asarray(res.ineqlin.marginals)[: sum(len(r) for r in rhs)]
        at = 0
        for i, sel in where:  # binding phase constraints: the next region across them
            k = sel.numel()
            tight = torch.as_tensor(np.abs(duals[at : at + k]) > 1e-12, device=sel.device)
            signs[i][sel[tight]] = -signs[i][sel[tight]]
            at += k
    return best


def _nearest(a_ub, b_ub, amat, mu, shape, deadline):
    """``min ‖g‖₁`` s.t. ``a_ub [p; q] <= b_ub`` (``g = p - q``): the HiGHS result and its
    image ``µ + Ag`` (clipped at 0, rescaled to µ's mass), or ``(None, None)``."""
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left <= 0:
        return None, None
    n_e = amat.shape[1]
    res = linprog(
        np.ones(2 * n_e),
        A_ub=a_ub,
        b_ub=b_ub,
        method="highs",
        options={} if left is None else {"time_limit": left},
    )
    if res.status != 0:
        return None, None
    return res, _image(res.x, amat, mu, shape)


def _image(pq, amat, mu, shape) -> np.ndarray:
    """The image ``µ + A(p - q)`` of the flows ``pq = [p; q]``, clipped at 0 and rescaled
    to µ's mass (rounding only: the caller re-checks it)."""
    n_e = amat.shape[1]
    nu = np.maximum(mu + amat @ (pq[:n_e] - pq[n_e : 2 * n_e]), 0.0)
    return (nu * mu.sum() / max(nu.sum(), 1e-300)).reshape(shape)
