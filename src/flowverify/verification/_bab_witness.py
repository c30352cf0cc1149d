"""Witnesses of the per-node-LP branch and bound (:mod:`._bab`): the exact check of an
adversarial flow (``argmax f(δ) ≠ y`` and ``R + Aδ >= 0``, Theorem 6's polytope), the
repair of an LP solution to a feasible image, the LP with a margin row that proposes one,
and an iterated linearisation (DeepFool-like, L1 and feasibility) from the image."""

from __future__ import annotations

import logging
import time

import numpy as np

from flowverify.verification._highs import new_highs, set_time_limit
from flowverify.verification._relaxlp import Problem

logger = logging.getLogger(__name__)

__all__ = ["margin_witness", "repair_feasibility", "verify_witness"]


def repair_feasibility(prob: Problem, g: np.ndarray, max_iter: int = 200) -> np.ndarray | None:
    """Make ``R + A(δµ + g) ≥ 0`` hold exactly in float64 by tiny changes of ``g``.

    LP solutions (and even ``R + Aδµ`` itself) can have pixels of ``-1e-15`` from
    rounding.  For each negative pixel the flow on the edge carrying the most mass out of
    it is reduced by the deficit plus a few ulps of that flow, which moves
    the deficit downstream; repeated until no pixel is negative.  The distance changes by
    about the total deficit.  Returns None if a deficit exceeds ``1e-7`` of the mass or
    the repair does not converge.
    """
    if not prob.feasible:
        return g
    g = np.array(g, dtype=np.float64)
    amat = prob.amat
    scale = 1e-7 * max(1.0, float(prob.channel_mass.max()))
    csr = amat.tocsr()
    for _ in range(max_iter):
        delta = prob.delta_mu + g
        nu = prob.reference + amat @ delta
        neg = np.nonzero(nu < 0)[0]
        if neg.size == 0:
            return g
        if -nu[neg].min() > scale:
            return None
        for i in neg:
            deficit = -nu[i]
            start, end = csr.indptr[i], csr.indptr[i + 1]
            edges = csr.indices[start:end]
            sgns = csr.data[start:end]  # column e adds sgn * flow_e to pixel i
            out = -sgns * delta[edges]  # mass leaving i along each edge
            k = int(np.argmax(out))
            if out[k] <= 0:
                return None
            e = edges[k]
            step = deficit + 4.0 * np.spacing(abs(delta[e])) + 4.0 * np.spacing(deficit)
            step = min(step, float(out[k]))
            g[e] += sgns[k] * step  # less mass leaves i
            delta[e] = prob.delta_mu[e] + g[e]
    return None


def verify_witness(prob: Problem, delta: np.ndarray) -> tuple[bool, float]:
    """Exact float64 check: ``argmax f(δ) ≠ y`` strictly, and ``R + Aδ ≥ 0`` if feasible."""
    logits = prob.forward(delta)
    y = prob.label
    others = np.delete(logits, y)
    margin = float(others.max() - logits[y])
    ok = margin > 0 and int(np.argmax(logits)) != y
    if ok and prob.feasible:
        nu = prob.reference + prob.amat @ delta
        ok = bool(nu.min() >= 0)
    return ok, margin


def margin_witness(prob: Problem, lp, kappa: float, tries: int = 6) -> np.ndarray | None:
    """A verified adversarial flow ``δ`` from ``lp`` (a :class:`RelaxationLP` whose node
    and radius are set), or None.

    The LP is re-solved with the margin ``f_t - f_y >= κ`` (``κ`` grown 10x per try, at
    most ``tries`` times) until its solution, repaired to ``R + Aδ >= 0``
    (:func:`repair_feasibility`), passes :func:`verify_witness`.  The margin is left set.
    """
    k = kappa
    for _ in range(tries):
        lp.set_margin(k)
        st, _, x = lp.solve()
        if st != "optimal":
            break
        g = repair_feasibility(prob, lp.flow(x))
        if g is not None and verify_witness(prob, prob.delta_mu + g)[0]:
            return prob.delta_mu + g
        k *= 10.0
    return None


def linearised_attack(solver, budget: float, iters: int = 12) -> None:
    """Iterated linearisation (DeepFool-like, L1 + feasibility) for every target.

    At ``δ_k`` the margin ``f_t - f_y`` is affine on the linear region of ``δ_k``,
    ``m(δ) = w·δ + c``; the LP ``min ‖δ - δµ‖₁ s.t. R + Aδ ≥ 0, w·δ + c ≥ κ'`` gives
    ``δ_{k+1}``.  Every iterate is checked exactly; adversarial ones become candidates
    (then improved by :meth:`_Solver.region_search` from the root).
    """
    import highspy

    prob = solver.prob
    n0 = prob.n0
    stop = time.perf_counter() + budget
    amat = prob.amat.tocoo()
    h = new_highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    h.addVars(2 * n0, np.zeros(2 * n0), np.full(2 * n0, inf))
    h.changeColsCost(2 * n0, np.arange(2 * n0, dtype=np.int32), np.ones(2 * n0))
    if prob.feasible:
        import scipy.sparse as sp

        mat = sp.hstack([prob.amat, -prob.amat]).tocsr()
        h.addRows(
            mat.shape[0],
            -prob.x0,
            np.full(mat.shape[0], inf),
            mat.nnz,
            mat.indptr[:-1].astype(np.int32),
            mat.indices.astype(np.int32),
            mat.data,
        )
    del amat
    margin_row = h.getNumRow()
    h.addRow(-inf, inf, 0, np.zeros(0, np.int32), np.zeros(0))
    scale = 1e-6 * max(1.0, float(np.abs(prob.forward(prob.delta_mu)).max()))
    for t in solver.targets:
        delta = prob.delta_mu.copy()
        for _ in range(iters):
            if time.perf_counter() > stop or solver.remaining() <= 0:
                return
            w, c = _local_margin(prob, delta, t)
            coef = np.concatenate([w, -w])
            h.deleteRows(1, np.array([margin_row], np.int32))
            nz = np.nonzero(coef)[0].astype(np.int32)
            rhs = scale - c - float(w @ prob.delta_mu)
            h.addRow(rhs, inf, nz.size, nz, coef[nz])
            set_time_limit(h, min(stop, solver.deadline) - time.perf_counter())
            h.run()
            if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                break
            x = np.asarray(h.getSolution().col_value)
            delta = prob.delta_mu + x[:n0] - x[n0:]
            if solver.consider(delta, t, "linearisation"):
                break
            if verify_witness(prob, delta)[0]:
                break


def _local_margin(prob: Problem, delta: np.ndarray, t: int):
    """``(w, c)`` with ``f_t - f_y = w·δ + c`` on the linear region of ``δ``."""
    jac = prob.weights[0].copy()
    off = prob.biases[0].copy()
    z = jac @ delta + off
    for w, b in zip(prob.weights[1:], prob.biases[1:], strict=True):
        d = (z > 0).astype(float)
        jac = w @ (d[:, None] * jac)
        off = w @ (d * off) + b
        z = w @ np.maximum(z, 0.0) + b
    y = prob.label
    return jac[t] - jac[y], float(off[t] - off[y])
