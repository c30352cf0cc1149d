r"""The LP relaxation of a flow-domain ReLU network over the feasibility polytope (HiGHS).

For one image, a radius ``ε`` and a target class ``t``, with pre-activation bounds
``l_k <= z_k <= u_k`` valid on the polytope (the engine's CROWN over the polytope,
:mod:`flowverify.verification.engine`), the LP

.. math::

    \min\ m_t(a_{L-2}) \quad\text{s.t.}\quad \nu = \mu + A(\gamma^+ - \gamma^-),\
    \nu \ge 0,\ \textstyle\sum(\gamma^+ + \gamma^-) \le \varepsilon,\
    z_0 = \tilde b + G(\nu - \mu)/s \pm r,\ z_k = W_k a_{k-1} + b_k,

with the triangle relaxation of every unstable ReLU (``a >= 0``, ``a >= z``,
``a <= u (z - l)/(u - l)``) and exact stable ones, is the tightest convex relaxation of
the margin ``f_y - f_t`` over ``B_ε(δµ) ∩ {R + Aδ >= 0}`` (Lemma 5, Theorem 6) given the
bounds.  ``ν`` is the image, ``γ^±`` the flow perturbation (``δ = δµ + γ^+ - γ^-``), ``r``
the residual of the image-space first layer.

Soundness does not rely on the solver's tolerances: the certificate is the
Neumaier–Shcherbina bound computed from HiGHS's row duals ``y`` in float64 with every
variable boxed, :math:`\min c^Tx \ge \sum_i \min(y_iL_i, y_iU_i) + \sum_j \min(d_jl_j,
d_ju_j)`, :math:`d = c - A^Ty`, valid for *any* ``y``.  Its only term depending on the
budget is ``y_b ε`` (``y_b <= 0``), so the same duals certify every ``ε' <= ε`` with the
affine bound ``β + |y_b|(ε - ε')``: the radius of the probe is read off directly.  A
solver that fails gives no certificate (the CROWN radius stands).
"""

from __future__ import annotations

import logging
import math

import highspy
import numpy as np
import scipy.sparse as sp
import torch

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.transport.flows import incidence_matrix
from flowverify.verification import flownet as _flownet
from flowverify.verification import numerics as _numerics
from flowverify.verification._highs import new_highs, set_time_limit

__all__ = ["LPOracle", "lp_margin_bounds"]

logger = logging.getLogger(__name__)


def _highs(time_limit: float | None) -> highspy.Highs:
    h = new_highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    set_time_limit(h, time_limit)  # one budget for every target of the call
    return h


class _Model:
    """The LP of one image at one radius, without objective (one column block per layer)."""

    def __init__(self, net: _flownet.FlowNet, batch: _flownet.Batch, b: int, bounds, eps: float):
        c, h, w = net.shape
        p = c * h * w
        a_one = incidence_matrix(h, w)
        a_mat = sp.block_diag([a_one] * c, format="csr") if c > 1 else a_one.tocsr()
        cd = a_mat.shape[1]
        mu = batch.mu[b]
        inv = batch.inv_scale[b].cpu().numpy()
        mass = mu.reshape(c, -1).sum(axis=1)
        # columns: nu | g+ | g- | (z_k, a_k) for k = 0 .. L-2
        cols_lo, cols_up = [np.zeros(p)], [np.repeat(mass, h * w)]
        cols_lo += [np.zeros(cd), np.zeros(cd)]
        cols_up += [np.full(cd, eps), np.full(cd, eps)]
        off = p + 2 * cd
        self.z_off, self.a_off = [], []
        lu = [(lo[b].cpu().numpy(), up[b].cpu().numpy()) for lo, up in bounds]
        for lo, up in lu:
            n_k = lo.size
            self.z_off.append(off)
            cols_lo.append(lo)
            cols_up.append(up)
            off += n_k
            self.a_off.append(off)
            cols_lo.append(np.maximum(lo, 0.0))
            cols_up.append(np.maximum(up, 0.0))
            off += n_k
        self.n_col = off
        rows, r_lo, r_up = [], [], []
        # nu - A g+ + A g- = mu
        blk = sp.hstack([sp.eye(p), -a_mat, a_mat, sp.csr_matrix((p, off - p - 2 * cd))])
        rows.append(blk)
        r_lo.append(mu)
        r_up.append(mu)
        # z_0 - (G/s) nu in centre - (G/s) mu -/+ r
        g_s = (net.G_np.reshape(-1, c, h * w) * inv[None, :, None]).reshape(-1, p)
        n0 = g_s.shape[0]
        resid = net.resid.cpu().numpy() * inv.max() * eps
        cen = batch.centre[b].cpu().numpy() - g_s @ mu
        blk = sp.hstack(
            [
                -sp.csr_matrix(g_s),
                sp.csr_matrix((n0, 2 * cd)),
                sp.eye(n0),
                sp.csr_matrix((n0, off - p - 2 * cd - n0)),
            ]
        )
        rows.append(blk)
        tol = _numerics.BOUND_RTOL * (1 + np.abs(cen))
        r_lo.append(cen - resid - tol)
        r_up.append(cen + resid + tol)
        # z_k - W_k a_{k-1} = b_k
        for k in range(1, len(lu)):
            wk = net.weights[k - 1].cpu().numpy()
            bk = net.biases[k - 1].cpu().numpy()
            n_k = wk.shape[0]
            blk = sp.lil_matrix((n_k, off))
            blk[:, self.a_off[k - 1] : self.a_off[k - 1] + wk.shape[1]] = wk
            blk = -blk.tocsr()
            blk = blk + sp.csr_matrix(
                (np.ones(n_k), (np.arange(n_k), self.z_off[k] + np.arange(n_k))), shape=(n_k, off)
            )
            rows.append(blk)
            r_lo.append(bk)
            r_up.append(bk)
        # ReLUs
        for k, (lo, up) in enumerate(lu):
            n_k = lo.size
            zi = self.z_off[k] + np.arange(n_k)
            ai = self.a_off[k] + np.arange(n_k)
            act = lo >= 0
            uns = (lo < 0) & (up > 0)
            if act.any():
                m = int(act.sum())
                rr = np.arange(m)
                blk = sp.csr_matrix(
                    (np.r_[np.ones(m), -np.ones(m)], (np.r_[rr, rr], np.r_[ai[act], zi[act]])),
                    shape=(m, off),
                )
                rows.append(blk)
                r_lo.append(np.zeros(m))
                r_up.append(np.zeros(m))
            if uns.any():
                m = int(uns.sum())
                rr = np.arange(m)
                slope = up[uns] / (up[uns] - lo[uns])
                blk = sp.csr_matrix(
                    (np.r_[np.ones(m), -np.ones(m)], (np.r_[rr, rr], np.r_[ai[uns], zi[uns]])),
                    shape=(m, off),
                )
                rows.append(blk)  # a - z >= 0
                r_lo.append(np.zeros(m))
                r_up.append(np.full(m, np.inf))
                blk = sp.csr_matrix(
                    (np.r_[np.ones(m), -slope], (np.r_[rr, rr], np.r_[ai[uns], zi[uns]])),
                    shape=(m, off),
                )
                rows.append(blk)  # a - s z <= -s l
                r_lo.append(np.full(m, -np.inf))
                r_up.append(-slope * lo[uns])
        # budget
        blk = sp.csr_matrix(
            (np.ones(2 * cd), (np.zeros(2 * cd, dtype=int), p + np.arange(2 * cd))), shape=(1, off)
        )
        rows.append(blk)
        r_lo.append(np.array([-np.inf]))
        r_up.append(np.array([eps]))
        self.budget_row = sum(r.shape[0] for r in rows) - 1
        self.A = sp.vstack(rows, format="csc")
        self.row_lo = np.concatenate(r_lo).astype(np.float64)
        self.row_up = np.concatenate(r_up).astype(np.float64)
        self.col_lo = np.concatenate(cols_lo).astype(np.float64)
        self.col_up = np.concatenate(cols_up).astype(np.float64)
        self.col_up = np.maximum(self.col_up, self.col_lo)
        self.last = self.a_off[-1] if lu else None
        self.eps = eps

    def pass_to(self, h: highspy.Highs) -> None:
        lp = highspy.HighsLp()
        lp.num_col_ = int(self.A.shape[1])
        lp.num_row_ = int(self.A.shape[0])
        lp.col_cost_ = np.zeros(self.A.shape[1])
        lp.col_lower_ = self.col_lo
        lp.col_upper_ = self.col_up
        lp.row_lower_ = self.row_lo
        lp.row_upper_ = self.row_up
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = self.A.indptr.astype(np.int32)
        lp.a_matrix_.index_ = self.A.indices.astype(np.int32)
        lp.a_matrix_.value_ = self.A.data.astype(np.float64)
        lp.a_matrix_.num_col_ = lp.num_col_
        lp.a_matrix_.num_row_ = lp.num_row_
        h.passModel(lp)

    def safe_bound(self, cost: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Neumaier–Shcherbina bound ``β`` at ``ε`` and ``|y_b|``.

        ``β(ε') = β + |y_b|(ε - ε')``.
        """
        y = _numerics.clean_duals(y, self.row_lo, self.row_up)
        y[self.budget_row] = min(y[self.budget_row], 0.0)
        mty, amty = self.A.T @ y, abs(self.A).T @ np.abs(y)
        val = _numerics.safe_lp_bound(
            cost, y, mty, amty, self.row_lo, self.row_up, self.col_lo, self.col_up
        )
        return val, -float(y[self.budget_row])


def lp_margin_bounds(
    net: _flownet.FlowNet,
    batch: _flownet.Batch,
    b: int,
    bounds,
    eps: float,
    targets,
    *,
    time_limit: float | None = None,
) -> dict[int, tuple[float, float]]:
    """Safe LP lower bounds of the margins ``targets`` of image ``b`` at radius ``eps``.

    Returns ``{t: (β_t, slope_t)}``: the margin is ``>= β_t + slope_t (ε - ε')`` on the
    polytope of every radius ``ε' <= eps`` (valid for any solver outcome; an LP that did
    not solve is left out).
    """
    if not net.num_relu:
        raise ValueError("net: the LP relaxation needs a ReLU network (linear: use CROWN)")
    model = _Model(net, batch, b, bounds, eps)
    h = _highs(time_limit)
    model.pass_to(h)
    spec_w = batch.spec_w[b].cpu().numpy()
    spec_b = batch.spec_b[b].cpu().numpy()
    out = {}
    for t in targets:
        cost = np.zeros(model.n_col)
        cost[model.last : model.last + spec_w.shape[1]] = spec_w[t]
        h.changeColsCost(model.n_col, np.arange(model.n_col, dtype=np.int32), cost)
        h.run()
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            logger.debug("lp: target %d status %s", t, h.modelStatusToString(status))
            continue
        sol = h.getSolution()
        beta, slope = model.safe_bound(cost, np.asarray(sol.row_dual))
        out[int(t)] = (beta + float(spec_b[t]), slope)
    return out


class LPOracle:
    """``F(ε)`` for the ``lp`` certifier: the polytope CROWN radius, improved by the LP.

    ``engine`` (an :class:`~flowverify.verification.engine.EngineProblem` over the W1
    polytope, on the same images as ``batch``) gives the pre-activation bounds and the
    CROWN radius of each margin.  Targets that CROWN already certifies at ``ε`` are
    skipped; for the others the LP's safe bound gives the largest ``ε' <= ε`` at which
    the margin stays positive.
    """

    def __init__(
        self,
        net: _flownet.FlowNet,
        batch: _flownet.Batch,
        engine,
        *,
        time_limit: float | None = None,
    ):
        self.net, self.batch, self.engine, self.time_limit = net, batch, engine, time_limit
        self.pre = sorted(engine.graph.pre_activations())

    def __call__(self, idx: np.ndarray, eps: np.ndarray) -> np.ndarray:
        net, eng = self.net, self.engine
        sub = self.batch.subset(idx)
        eps = np.asarray(eps, dtype=np.float64)
        idx_e, eps_t = eng._eps(idx, eps)
        with torch.no_grad():
            found, _, lin = eng.margins(idx_e, eps_t)
            rad = eng._radii(lin, eps_t, idx_e).cpu().numpy()
        bounds = [tuple(t.reshape(len(idx), -1) for t in found[i]) for i in self.pre]
        if not net.num_relu:
            return rad.min(axis=1)
        for b in range(len(idx)):
            e = float(eps[b])
            if e <= 0:
                continue
            todo = np.flatnonzero(rad[b] < e)
            if todo.size == 0:
                continue
            try:
                res = lp_margin_bounds(net, sub, b, bounds, e, todo, time_limit=self.time_limit)
            except Exception as exc:  # a solver failure never invalidates the CROWN radius
                raise_if_interrupted(exc)
                logger.exception("lp: the LP relaxation failed; keeping the CROWN radius")
                continue
            for t, (beta, slope) in res.items():
                tol = _numerics.MARGIN_RTOL * (1.0 + abs(beta))
                if beta > tol:
                    r_t = e
                elif slope > 0:
                    r_t = e - (tol - beta) / slope
                else:
                    r_t = 0.0
                if math.isfinite(r_t):
                    rad[b, t] = max(rad[b, t], r_t)
        return rad.min(axis=1)
