r"""Complete certification: the exact W1 radius in the flow domain.

For an image ``µ = R + Aδµ`` of class ``y`` and the flow-domain network ``f̃`` (an
:class:`~flowverify.verification._chain.AffineChain`), SPEC section 4 ("Complete") and
Theorem 6 give the exact radius

.. math::

    r^* = \min_{t \ne y}\ \min_\delta \{\ \|\delta - \delta_\mu\|_1 :
          R + A\delta \ge 0,\ \tilde f_t(\delta) \ge \tilde f_y(\delta)\ \},

the W1 distance from ``µ`` to the closest image of another class (Theorem 1: the minimal
flow between ``µ`` and ``Δ(R, δ)`` costs at most ``‖δ - δµ‖₁``, with equality at the
optimum), and ``Δ(R, δ*)`` is that image.  Without ``R + Aδ ≥ 0`` it is the exact L1-ball
radius of ``f̃`` ("complete-ball", Table 1 of the paper), which can only be smaller.

Algorithms
----------
* Linear chains (one affine layer, Appendix A): Lemma 8's LP, one per target (Lemma 7's
  closed form without feasibility).  Exact and fast.
* ``algorithm="bab"`` (default): best-first branch and bound over ReLU splits
  (:mod:`._bab`).  Node bounds: LP relaxation (triangle relaxation of unstable ReLUs,
  image-space form) with intermediate bounds from the engine's CROWN, whose linear
  bounds are minimised *exactly* over the W1 ball ∩ feasibility polytope by Kantorovich
  duality (:func:`~.chain_bounds.relu_bounds`), recomputed under every split and over
  the ball of the search radius; that radius grows from ``lower_bound`` by steps (searches over
  ``P_ε``, each proving ``r* ≥ ε`` when it closes) before the gap to the incumbent is
  closed.  Upper bounds: the caller's witness, an iterated-linearisation attack, every
  LP solution, and a local search over linear regions.
* ``algorithm="milp"``: the big-M MILP solved by HiGHS per target (a cross-check for
  small networks; its dual bound is trusted as HiGHS reports it).

Soundness
---------
* ``lower`` is a proven lower bound: LP bounds are recomputed from the solver's duals by
  a Neumaier-Shcherbina bound with every column boxed, so solver tolerances cannot
  inflate it; infeasibility is accepted only with a verified dual ray; intermediate
  bounds carry rounding margins.
* ``upper`` is the distance of a witness checked by an exact float64 forward pass:
  ``argmax f̃(δ*) ≠ y`` with a strictly positive margin, and ``R + Aδ* ≥ 0`` exactly
  (tiny negative pixels left by the LP are repaired by moving the deficit along an edge).
  Witnesses are found with the margin constraint ``f_t - f_y ≥ κ`` (``κ`` = 1e-9 of the
  logit scale, raised if the check fails), so ``upper`` approaches ``r*`` from above;
  ties ``f_t = f_y`` are never reported as adversarial.
* ``status`` (:class:`~._exact.ExactStatus`) is ``OPTIMAL`` only when ``upper - lower ≤
  rtol · upper`` (``rtol = 1e-6``).  Otherwise ``TIMEOUT`` (time limit) or ``BOUNDED``
  (the search was restricted to the radius of an ``upper_bound`` hint) with the best
  proven ``lower``; ``UNVERIFIED`` when no candidate passed the exact check;
  ``INFEASIBLE`` when no image of the same mass is classified otherwise (feasible
  problems only; ``lower = upper = inf``); ``ERROR`` when hints were inconsistent.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from flowverify.transport.flows import flow_dim
from flowverify.verification._bab import branch_and_bound
from flowverify.verification._bab_witness import (
    margin_witness,
    repair_feasibility,
    verify_witness,
)
from flowverify.verification._exact import (
    ExactResult,
    ExactStatus,
    _diameter,
    _witness_target,
    chain_problem,
)
from flowverify.verification._relaxlp import Problem, RelaxationLP
from flowverify.verification.chain_bounds import lp_image_form

__all__ = ["ALGORITHMS", "ExactResult", "exact_radius"]

logger = logging.getLogger(__name__)

ALGORITHMS = ("bab", "milp")


def _linear_ball(prob: Problem, rtol: float, t0: float) -> ExactResult:
    """Lemma 7: the exact L1-ball radius of a linear chain, in closed form."""
    w, b = prob.weights[0], prob.biases[0]
    y = prob.label
    logits = prob.forward(prob.delta_mu)
    best, best_delta, best_t, lower = math.inf, None, None, math.inf
    unverified = False  # a target whose closed-form witness never passed the check
    for t in range(prob.num_classes):
        if t == y:
            continue
        wt = w[t] - w[y]
        m0 = float(logits[t] - logits[y])  # margin f_t - f_y at δµ (< 0)
        j = int(np.argmax(np.abs(wt)))
        slope = abs(float(wt[j]))
        if slope == 0.0:
            continue  # the margin is constant: never adversarial
        r_t = max(0.0, -m0) / slope
        lower = min(lower, r_t * (1 - 1e-12) - 1e-300)
        step = r_t * (1 + 1e-12) + 1e-300
        for _ in range(60):
            delta = prob.delta_mu.copy()
            delta[j] += math.copysign(step, wt[j])
            ok, _ = verify_witness(prob, delta)
            if ok:
                break
            step = step * (1 + 1e-9) + 1e-15 * (1 + step)
        else:
            unverified = True
            continue
        dist = float(np.abs(delta - prob.delta_mu).sum())
        if dist < best:
            best, best_delta, best_t = dist, delta, t
    del b
    secs = time.perf_counter() - t0
    if best_delta is None:
        if unverified:  # never claim "no adversarial" without a proof
            return ExactResult.no_witness(
                ExactStatus.UNVERIFIED, max(0.0, lower), "lemma7: no witness verified", secs, 0
            )
        return ExactResult.no_witness(ExactStatus.INFEASIBLE, math.inf, "lemma7", secs, 0)
    ok = best - lower <= rtol * best + 1e-12
    status = ExactStatus.OPTIMAL if ok else ExactStatus.BOUNDED
    return ExactResult(
        status, max(0.0, min(lower, best)), best, best_delta, best_t, "lemma7", secs, 0
    )


def _linear_exact(
    prob: Problem, radius: float, deadline: float, rtol: float, kappa: float, incumbent, t0: float
) -> ExactResult:
    """Lemma 8: one LP per target, ``min ‖g‖₁ s.t. x0 + Ag ≥ 0, f_t - f_y ≥ 0``."""
    v_img, resid = lp_image_form(prob)  # prob.feasible: Lemma 8 is the feasible LP
    best, best_delta = math.inf, None
    if incumbent is not None:
        best_delta = incumbent
        best = float(np.abs(incumbent - prob.delta_mu).sum())
    lower = math.inf
    timed_out = False
    unverified = False  # an optimal LP whose solution could not be made a verified witness
    for t in range(prob.num_classes):
        if t == prob.label:
            continue
        if time.perf_counter() > deadline:
            timed_out = True
            lower = min(lower, 0.0)
            continue
        lp = RelaxationLP(
            prob,
            t,
            radius,
            [],
            v_img=v_img,
            resid=resid,
        )
        lp.set_time_limit(max(deadline - time.perf_counter(), 1e-3))
        st, lb, x = lp.solve()
        if st == "infeasible":
            continue
        if st != "optimal":
            timed_out = True
            lower = min(lower, 0.0)
            continue
        lower = min(lower, lb)
        if lb >= best:
            continue
        delta = margin_witness(prob, lp, kappa)
        if delta is None:
            unverified = True
            continue
        dist = float(np.abs(delta - prob.delta_mu).sum())
        if dist < best:
            best, best_delta = dist, delta
    secs = time.perf_counter() - t0
    if best_delta is None:
        if unverified and not timed_out:
            return ExactResult.no_witness(
                ExactStatus.UNVERIFIED,
                max(0.0, min(lower, radius)),
                "lemma8-lp: an adversarial region was found but no witness verified",
                secs,
                0,
            )
        if timed_out:
            return ExactResult.no_witness(
                ExactStatus.TIMEOUT, max(lower, 0.0), "lemma8-lp: time limit", secs, 0
            )
        if radius >= _diameter(prob):
            return ExactResult.no_witness(
                ExactStatus.INFEASIBLE, math.inf, "lemma8-lp: no adversarial image", secs, 0
            )
        return ExactResult.no_witness(
            ExactStatus.ERROR,
            radius,
            "lemma8-lp: no adversarial within the upper_bound hint",
            secs,
            0,
        )
    lower = min(lower, best)
    ok = not timed_out and best - lower <= rtol * best + 1e-12
    return ExactResult(
        ExactStatus.OPTIMAL if ok else (ExactStatus.TIMEOUT if timed_out else ExactStatus.BOUNDED),
        max(lower, 0.0),
        best,
        best_delta,
        _witness_target(prob, best_delta),
        "lemma8-lp",
        secs,
        0,
    )


def exact_radius(
    chain,
    delta_mu,
    reference,
    label,
    *,
    height,
    width,
    feasible=True,
    timeout=None,
    lower_bound=0.0,
    upper_bound=math.inf,
    witness_flow=None,
    algorithm: str = "bab",
    rtol: float = 1e-6,
) -> ExactResult:
    r"""The exact W1 radius (or exact L1-ball radius) of one image.

    .. math::

        r^* = \min_{t \ne y} \min \{ \|\delta - \delta_\mu\|_1 :
              R + A\delta \ge 0 \text{ (if feasible)},\ f_t(\delta) \ge f_y(\delta) \}.

    Parameters
    ----------
    chain : AffineChain
        The flow-domain network (input ``δ`` of dimension ``C*D``, logits out).
    delta_mu : ndarray, shape (C*D,)
        ``δµ`` with ``R + Aδµ = µ``.
    reference : ndarray, shape (C*H*W,)
        ``R`` in data units (block-diagonal ``A`` over channels).
    label : int
        The class of ``µ``.
    height, width : int
        Image grid.
    feasible : bool
        Restrict to flows that give images (``R + Aδ ≥ 0``, Theorem 6).  False: the
        plain L1 ball ("complete-ball").
    timeout : float, optional
        Seconds; at the limit the result has status ``TIMEOUT`` and the proven
        ``lower``.
    lower_bound : float
        A proven lower bound (from an incomplete certifier); reported if better.
    upper_bound : float
        An upper bound on ``r*`` (e.g. from an attack): the search is restricted to the
        ball of that radius.
    witness_flow : ndarray, optional
        An adversarial flow; verified here and used as the first incumbent.
    algorithm : {"bab", "milp"}
        Branch and bound (default) or the big-M MILP (cross-check, small networks).
    rtol : float
        Relative optimality tolerance of ``upper - lower``.

    Returns
    -------
    ExactResult
    """
    t0 = time.perf_counter()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    weights = [np.asarray(w, dtype=np.float64) for w in chain.weights]
    delta_mu = np.asarray(delta_mu, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    height, width = int(height), int(width)
    npix = height * width
    if reference.size % npix:
        raise ValueError(
            f"reference: expected C*H*W values for a {height}x{width} grid, got {reference.size}"
        )
    channels = reference.size // npix
    n0 = channels * flow_dim(height, width)
    if delta_mu.size != n0:
        raise ValueError(f"delta_mu: expected {n0} = C*D values, got {delta_mu.size}")
    if weights[0].shape[1] != n0:
        raise ValueError(f"chain: expects {weights[0].shape[1]} inputs, the flows have {n0}")
    num_classes = weights[-1].shape[0]
    if not 0 <= int(label) < num_classes:
        raise ValueError(f"label: expected 0 <= label < {num_classes}, got {label}")
    if not rtol > 0:
        raise ValueError(f"rtol: expected > 0, got {rtol}")
    deadline = math.inf if timeout is None else t0 + float(timeout)
    prob = chain_problem(
        chain, delta_mu, reference, label, height=height, width=width, feasible=feasible
    )
    logits0 = prob.forward(delta_mu)
    kappa = 1e-9 * max(1.0, float(np.abs(logits0).max()))

    # the image itself may already be misclassified: radius 0
    g0 = repair_feasibility(prob, np.zeros(n0))
    if g0 is not None and verify_witness(prob, delta_mu + g0)[0]:
        d0 = delta_mu + g0
        dist = float(np.abs(g0).sum())
        return ExactResult(
            ExactStatus.OPTIMAL,
            0.0,
            dist,
            d0,
            _witness_target(prob, d0),
            "misclassified",
            time.perf_counter() - t0,
            0,
        )

    incumbent = None
    if witness_flow is not None:
        cand = np.asarray(witness_flow, dtype=np.float64).reshape(-1)
        if cand.size == n0:
            g = repair_feasibility(prob, cand - delta_mu)
            if g is not None and verify_witness(prob, delta_mu + g)[0]:
                incumbent = delta_mu + g
        if incumbent is None:
            logger.info("witness_flow hint is not a verified adversarial; ignored")
    if incumbent is not None:
        radius = float(np.abs(incumbent - delta_mu).sum())
    elif upper_bound is not None and math.isfinite(upper_bound) and upper_bound > 0:
        radius = float(upper_bound) * (1 + 1e-9) + 1e-12
    elif feasible:
        radius = _diameter(prob)
    else:
        radius = _diameter(prob) * 4.0  # no bound for the ball: a large search radius
    hinted = incumbent is None and math.isfinite(upper_bound or math.inf)

    if len(weights) == 1:
        if not feasible:
            res = _linear_ball(prob, rtol, t0)
        else:
            res = _linear_exact(
                prob,
                max(radius, _diameter(prob)) if incumbent is None else radius,
                deadline,
                rtol,
                kappa,
                incumbent,
                t0,
            )
        return _with_lower_hint(res, lower_bound)

    search = dict(radius=radius, deadline=deadline, rtol=rtol, kappa=kappa, incumbent=incumbent)
    if algorithm == "milp":
        from flowverify.verification._milp import milp_exact

        return _with_lower_hint(milp_exact(prob, t0=t0, **search), lower_bound)

    out = branch_and_bound(prob, lower_hint=float(lower_bound or 0.0), **search)
    secs = time.perf_counter() - t0
    info = (
        f"bab: {out.nodes} nodes, {out.stats.get('lp_solves', 0)} LPs, "
        f"{out.stats.get('open', 0)} open"
    )
    if out.status == "infeasible":
        if feasible and not hinted and incumbent is None:
            return ExactResult.no_witness(
                ExactStatus.INFEASIBLE, math.inf, info + "; no adversarial image", secs, out.nodes
            )
        msg = "no adversarial within the search radius"
        st = ExactStatus.ERROR if hinted else ExactStatus.BOUNDED
        return ExactResult(st, radius, math.inf, None, None, f"{info}; {msg}", secs, out.nodes)
    if out.witness is None:
        lower = max(0.0, out.lower)
        return ExactResult.no_witness(out.status, lower, info + "; " + out.message, secs, out.nodes)
    res = ExactResult(
        out.status, max(0.0, out.lower), out.upper, out.witness, out.target, info, secs, out.nodes
    )
    return _with_lower_hint(res, lower_bound)


def _with_lower_hint(res: ExactResult, lower_bound) -> ExactResult:
    """Report a caller's proven lower bound if it is better (and consistent)."""
    try:
        hint = float(lower_bound or 0.0)
    except (TypeError, ValueError):
        return res
    if not math.isfinite(hint) or hint <= res.lower:
        return res
    if hint > res.upper * (1 + 1e-9):
        logger.warning(
            "lower_bound hint %.6g exceeds a verified adversarial (%.6g); ignored", hint, res.upper
        )
        return res
    res.lower = min(hint, res.upper)
    return res
