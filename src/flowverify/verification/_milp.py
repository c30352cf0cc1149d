r"""Big-M MILP for the exact W1 radius (a cross-check for small networks).

Per target ``t`` (SPEC section 4, Theorem 6): the LP of :mod:`._relaxlp` plus, for every
unstable ReLU (``l < 0 < u`` over ``P_U``), a binary ``d`` with

.. math::

    a \le u\,d, \qquad a \le z - l\,(1 - d),

so that ``a = relu(z)`` exactly; HiGHS minimises ``‖g‖₁`` with the incumbent radius as
objective cutoff.  The minimiser's activation pattern is re-solved as an exact region LP
with margin ``f_t - f_y ≥ κ`` and verified by a float64 forward pass.  The lower bound is
HiGHS's MIP dual bound (minus ``1e-7`` relative for its tolerances), combined with the
sound LP bound of the root; unlike the branch and bound of :mod:`._bab` it is not
recomputed from duals, hence "cross-check".
"""

from __future__ import annotations

import logging
import math
import time

import highspy
import numpy as np

from flowverify.verification._bab_witness import margin_witness
from flowverify.verification._exact import ExactResult, ExactStatus, _diameter, _witness_target
from flowverify.verification._highs import new_highs, set_time_limit
from flowverify.verification._relaxlp import Problem, RelaxationLP
from flowverify.verification.chain_bounds import lp_image_form, relu_bounds

__all__ = ["milp_exact"]

logger = logging.getLogger(__name__)

_MS = highspy.HighsModelStatus


def _region_witness(prob, lp: RelaxationLP, bounds, x, kappa):
    """Exact LP on the linear region of the MILP solution, margin ≥ κ; verified flow."""
    delta = prob.delta_mu + lp.flow(x)
    pre = prob.pre_activations(delta)
    splits = []
    for k, z in enumerate(pre):
        zlp = lp.layer_values(x, k)[0]
        s = np.where(z > 0, 1, np.where(z < 0, -1, np.where(zlp > 0, 1, -1)))
        lo, hi = bounds[k]
        s = np.where(lo >= 0, 1, np.where(hi <= 0, -1, s))
        splits.append(s.astype(np.int8))
    lp.set_node(bounds, splits)
    witness = margin_witness(prob, lp, kappa)
    if witness is None:
        lp.set_margin(0.0)
    return witness


def milp_exact(prob: Problem, *, radius, deadline, rtol, kappa, incumbent, t0):
    """Exact radius by one big-M MILP per target (HiGHS); returns an ExactResult."""
    v_img, resid = lp_image_form(prob)
    bounds = relu_bounds(prob, radius)
    best, best_delta = math.inf, None
    if incumbent is not None:
        best_delta = incumbent
        best = float(np.abs(incumbent - prob.delta_mu).sum())
    zero = [np.zeros(n, np.int8) for n in prob.hidden]
    order = []
    lower = math.inf
    nodes = 0
    timed_out = False
    unverified = False  # an optimal MILP whose solution gave no verified witness
    for t in range(prob.num_classes):
        if t == prob.label:
            continue
        lp = RelaxationLP(
            prob,
            t,
            radius,
            bounds,
            v_img=v_img,
            resid=resid,
        )
        lp.set_node(bounds, zero)
        lp.set_time_limit(max(deadline - time.perf_counter(), 1e-3))
        st, lb, _ = lp.solve()
        if st == "infeasible":
            continue
        order.append((lb if st == "optimal" else 0.0, t, lp))
    order.sort(key=lambda r: r[0])
    for lb, _t, lp in order:
        if lb >= best:
            lower = min(lower, lb)
            continue
        rem = deadline - time.perf_counter()
        if rem <= 0:
            timed_out = True
            lower = min(lower, lb)
            continue
        h = new_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.passModel(lp.h.getLp())
        set_time_limit(h, rem)
        h.setOptionValue("mip_rel_gap", rtol / 10)
        h.setOptionValue("mip_abs_gap", 1e-12)
        h.setOptionValue("mip_feasibility_tolerance", 1e-9)
        if math.isfinite(best):
            h.setOptionValue("objective_bound", float(best))
        inf = highspy.kHighsInf
        for k, (lo, hi) in enumerate(bounds):
            zo = lp.zoff[k]
            n = lo.size
            for j in np.nonzero((lo < 0) & (hi > 0))[0]:
                col = h.getNumCol()
                h.addVar(0.0, 1.0)
                h.changeColIntegrality(col, highspy.HighsVarType.kInteger)
                a_col, z_col = zo + n + int(j), zo + int(j)
                # a - u d <= 0
                h.addRow(
                    -inf, 0.0, 2, np.array([a_col, col], np.int32), np.array([1.0, -float(hi[j])])
                )
                # a - z - l d <= -l
                h.addRow(
                    -inf,
                    -float(lo[j]),
                    3,
                    np.array([a_col, z_col, col], np.int32),
                    np.array([1.0, -1.0, -float(lo[j])]),
                )
        h.run()
        ms = h.getModelStatus()
        info = h.getInfo()
        nodes += int(info.mip_node_count)
        dual = float(info.mip_dual_bound)
        if ms == _MS.kOptimal:
            x = np.asarray(h.getSolution().col_value)[: lp.ncol]
            lower = min(lower, max(lb, dual - 1e-7 * abs(dual)))
            w = _region_witness(prob, lp, bounds, x, kappa)
            if w is not None:
                d = float(np.abs(w - prob.delta_mu).sum())
                if d < best:
                    best, best_delta = d, w
            else:
                unverified = True
        elif ms in (_MS.kInfeasible, _MS.kObjectiveBound):
            lower = min(lower, best if math.isfinite(best) else math.inf)
        else:
            timed_out = True
            bound = dual if math.isfinite(dual) else lb
            lower = min(lower, max(lb, bound - 1e-7 * abs(bound)))
    secs = time.perf_counter() - t0
    if best_delta is None:
        if timed_out or unverified:
            return ExactResult.no_witness(
                ExactStatus.TIMEOUT if timed_out else ExactStatus.UNVERIFIED,
                max(0.0, min(lower, radius)),
                "milp: time limit" if timed_out else "milp: no witness verified",
                secs,
                nodes,
            )
        if prob.feasible and radius >= _diameter(prob):
            return ExactResult.no_witness(
                ExactStatus.INFEASIBLE, math.inf, "milp: no adversarial image", secs, nodes
            )
        return ExactResult.no_witness(
            ExactStatus.BOUNDED,
            radius,
            "milp: no adversarial within the search radius",
            secs,
            nodes,
        )
    lower = max(0.0, min(lower, best))
    ok = not timed_out and best - lower <= rtol * best + 1e-12
    return ExactResult(
        ExactStatus.OPTIMAL if ok else (ExactStatus.TIMEOUT if timed_out else ExactStatus.BOUNDED),
        lower,
        best,
        best_delta,
        _witness_target(prob, best_delta),
        "milp (HiGHS)",
        secs,
        nodes,
    )
