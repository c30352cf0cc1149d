"""Complete certification of one image: the incomplete radius from below, the attacks
from above, then branch and bound on the engine (``beta-crown``, splitting ReLUs with
optimised multipliers) or the LP/MILP search on a chain of layers: the exact radius
(Table 1), the proven bracket, or a fixed-``ε`` decision.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from flowverify.core.results import Status
from flowverify.model.flow_model import (
    FlowModel,
)
from flowverify.transport.flows import apply_flow, inverse_flow, w1_distance
from flowverify.verification._chain import affine_chain
from flowverify.verification._exact import ExactStatus
from flowverify.verification.checks import INVERSE_METHOD, _check_architecture, _e_max
from flowverify.verification.complete import exact_radius
from flowverify.verification.context import (
    _build_ref,
    _Ctx,
    _eps_raw,
    _mass,
    _predict,
    _result,
)
from flowverify.verification.falsify import _adversary_upper, _fw_min_radius
from flowverify.verification.incomplete import _engine_radii
from flowverify.verification.result import CertifyResult

# ----------------------------------------------------------------------------- complete


def _complete_one(ctx: _Ctx, x: np.ndarray, label: int, ref: np.ndarray, eps_raw):
    """Exact radius of one image over the polytope (or the ball), or with ``eps_raw`` the
    decision at that radius (``beta-crown`` only). Returns a dict."""
    t_end = None if ctx.timeout is None else time.perf_counter() + ctx.timeout
    feasible = ctx.method == "complete"
    c, h, w = x.shape
    e_max = float(_e_max(x[None])[0])
    # lower bound: the incomplete radius of the same region
    lower, _ = _engine_radii(
        ctx,
        x[None],
        np.array([label]),
        None,
        method="feasible" if feasible else "vanilla",
        certifier="crown",
    )
    lower = float(lower[0])
    # upper bound: Frank-Wolfe and PGD attacks (valid for the ball too: feasible ⊂ ball)
    upper, adv = _fw_min_radius(ctx, x, label, lower, e_max)
    p_upper, p_adv = _adversary_upper(ctx, x, label)
    if p_upper < upper:
        upper, adv = p_upper, p_adv
    if ctx.certifier == "beta-crown" and (ctx.graph.activations() or not _is_chain(ctx.model)):
        return _complete_engine(ctx, x, label, eps_raw, lower, upper, adv, t_end)
    # a linear chain: the polytope bound is exact (Lemma 8), the chain's LP gives the witness
    dmu = np.asarray(inverse_flow(ref, x, method=INVERSE_METHOD), dtype=np.float64)
    fm = FlowModel(ctx.model64, torch.as_tensor(ref), input_scale=ctx.input_scale, fuse=True)
    chain = affine_chain(fm, 0)
    witness_flow = None
    if adv is not None:
        witness_flow = (dmu + np.asarray(inverse_flow(x, adv, method=INVERSE_METHOD))).reshape(-1)
    remaining = None if t_end is None else max(t_end - time.perf_counter(), 1e-3)
    kwargs = dict(
        height=h,
        width=w,
        feasible=feasible,
        timeout=remaining,
        lower_bound=lower,
        upper_bound=upper,
        witness_flow=witness_flow,
        algorithm="bab" if ctx.certifier == "beta-crown" else ctx.certifier,
    )
    res = exact_radius(chain, dmu.reshape(-1), ref.reshape(-1), int(label), **kwargs)
    out = {
        "nodes": res.nodes,
        "solver_status": res.solver_status,
        "lower": max(res.lower, lower),
        "upper": min(res.upper, upper),
        "exact": res.status == ExactStatus.OPTIMAL,
        "witness": None,
        "message": None,
    }
    if res.witness_flow is not None and res.upper <= upper:
        out["witness"] = apply_flow(ref, np.asarray(res.witness_flow, np.float64).reshape(c, -1))
    elif adv is not None:
        out["witness"] = adv
    if res.status == ExactStatus.INFEASIBLE:  # no image of this mass is classified otherwise
        out.update(exact=True, lower=e_max, upper=math.inf, witness=None)
        out["message"] = "no adversarial image exists; radius capped at the grid diameter"
    elif res.status == ExactStatus.ERROR:
        out["message"] = f"complete solver error ({res.solver_status})"
    elif not out["exact"]:
        out["message"] = f"{_OPEN[res.status]} ({res.solver_status})" + (
            f"; the exact radius lies in [{out['lower']:.6g}, {out['upper']:.6g}] (raw)"
        )
    return out


#: Why an exact search ended without the exact radius.
_OPEN = {
    ExactStatus.TIMEOUT: "time limit reached",
    ExactStatus.BOUNDED: "the search was restricted to the attacks' radius",
    ExactStatus.UNVERIFIED: "no candidate adversarial passed the exact check",
}


#: A decision polishes the attacks' closest adversarial only if it lies within this factor
#: of ``ε`` (the polish gained 0.2-11% of W1 on fc and the 256x2 net, in 0.5-3.5 s).
POLISH_REACH = 1.2

#: The share of a decision's time for the radius search climbing to ``ε`` from the proven
#: side; the rest goes to one decision at ``ε`` from the root.  Measured on the 256x2 net
#: at 60 s: the climb alone decided digits 5 and 17 (in 7 and 30 s) that the decision
#: alone left open, and left open 14 and 16 that it decides (in 33 and 23 s).
CLIMB_SHARE = 0.25


def _is_chain(model) -> bool:
    try:
        _check_architecture(model)
    except ValueError:
        return False
    return True


def _complete_engine(ctx: _Ctx, x, label, eps_raw, lower, upper, adv, t_end) -> dict:
    """``beta-crown``: branch and bound on the engine (:mod:`.engine.bab`) between the
    CROWN radius ``lower`` and the attacks' ``upper``; every witness is re-checked by the
    model and an exact W1.  A decision at ``eps_raw`` first climbs to it by the radius
    search (:meth:`~.engine.bab_search.BabSearch.radius` with ``target``, for
    :data:`CLIMB_SHARE` of the time), then decides at ``ε`` from the root."""
    from flowverify.verification.engine.bab import SplitBab
    from flowverify.verification.engine.region import polish

    e_max = float(_e_max(x[None])[0])
    inv = 1.0 / x.sum(axis=(-2, -1)) if ctx.input_scale == "normalised" else None
    bab = SplitBab(
        ctx.graph, x, label, feasible=ctx.method == "complete", inv_scale=inv, device=ctx.device
    )
    bab.check = lambda image: _misclassified(ctx, image, label)
    near = eps_raw is None or upper <= POLISH_REACH * eps_raw  # else a decision needs proof
    if adv is not None and near:  # the attacks' closest adversarial, polished on its region
        left = None if t_end is None else t_end - time.perf_counter()
        share = None if left is None else time.perf_counter() + 0.1 * max(left, 0.0)
        better = polish(bab, adv, deadline=share, check=bab.check)  # checked, exact W1
        if better is not None and better[1] < upper:
            adv, upper = better
    hi = upper if math.isfinite(upper) else e_max
    out = {"solver_status": "beta-crown", "witness": adv, "message": None}
    if eps_raw is None:
        res = bab.radius(lower, hi, adv, deadline=t_end, rtol=ctx.rtol)
        lower, witness = res.lower, res.witness
        out["exact"] = res.exact and witness is not None
        if not out["exact"]:
            out["message"] = (res.message or "time limit reached") + (
                f"; the exact radius lies in [{res.lower:.6g}, {res.upper:.6g}] (raw)"
            )
    else:
        out["exact"] = False
        witness = adv if upper <= eps_raw else None
        if lower < eps_raw and witness is None:
            now = time.perf_counter()
            climb = None if t_end is None else now + CLIMB_SHARE * max(t_end - now, 0.0)
            res = bab.radius(lower, hi, adv, deadline=climb, rtol=ctx.rtol, target=eps_raw)
            if res.lower >= eps_raw:
                lower = eps_raw
            elif res.upper <= eps_raw and res.witness is not None:
                witness = res.witness
            else:  # then one decision at ε, from the root (a tree of its own)
                lower = max(lower, res.lower)
                dec = bab.decide(eps_raw, deadline=t_end, fresh=True)
                if dec.status == "certified":
                    lower = eps_raw
                elif dec.status == "falsified":
                    witness = dec.witness
                else:
                    lower = max(lower, min(dec.proven, eps_raw))
                    out["message"] = f"branch and bound: {dec.message}"
    if witness is not None and witness is not adv:
        w1 = _checked_w1(ctx, witness, x, label)
        if w1 < upper:
            upper, adv = w1, witness
        if eps_raw is not None and not w1 <= eps_raw:
            out["message"] = "branch and bound: its witness did not survive the re-check"
    out.update(lower=lower, upper=upper, witness=adv, nodes=bab.nodes)
    if out["exact"] and not upper <= lower * (1 + ctx.rtol):
        out["exact"] = False  # the witness did not survive the re-check
    return out


def _misclassified(ctx: _Ctx, image, label) -> bool:
    """Whether the user's model classifies ``image`` ``(C, H, W)`` other than ``label``."""
    return bool(_predict(ctx.model, image[None], ctx.flat, ctx.input_scale)[0] != label)


def _checked_w1(ctx: _Ctx, image, x, label) -> float:
    """The exact W1 from ``x`` of ``image`` if the model misclassifies it, else ``inf``."""
    if not _misclassified(ctx, image, label):
        return math.inf
    return float(w1_distance(image, x, unit="raw"))


def _complete_result(ctx, x, lab, pred, idx, ref_sets, i, eps, unit) -> CertifyResult:
    t0 = time.perf_counter()
    refs = ref_sets[i]
    mass = float(_mass(x[i : i + 1])[0])
    ref = _build_ref(refs[0], x[i])
    e_raw = None if eps is None else _eps_raw(eps, unit, mass)
    res = _complete_one(
        ctx, x[i], int(lab[i]), ref, e_raw if ctx.certifier == "beta-crown" else None
    )
    lower, upper = res["lower"], res["upper"]
    kw: dict[str, Any] = dict(
        radius=lower / mass,
        radius_raw=lower,
        per_reference={refs[0].name: lower / mass},
        lower=lower / mass,
        upper=upper / mass,
        upper_raw=upper,
        mass=mass,
        best_reference=refs[0].name,
        solver_status=res["solver_status"],
        exact=bool(res["exact"]),
        message=res.get("message"),
        nodes=res.get("nodes"),
    )
    names = [refs[0].name]
    if eps is None:
        status = Status.CERTIFIED if res["exact"] and lower > 0 else Status.UNKNOWN
        if res["exact"]:
            kw["witness"] = res["witness"]
    else:
        e_raw = _eps_raw(eps, unit, mass)
        kw.update(eps=e_raw / mass, eps_raw=e_raw)
        if lower >= e_raw and lower > 0:
            status = Status.CERTIFIED
        elif upper <= e_raw and res["witness"] is not None:
            status = Status.FALSIFIED
            kw["witness"] = res["witness"]
        else:
            status = Status.UNKNOWN
    if res.get("message") and not res["exact"] and eps is None:
        status = Status.UNKNOWN
    if status == Status.UNKNOWN and res["witness"] is not None and math.isfinite(upper):
        kw["witness"] = res["witness"]  # the closest adversarial image found: not a proof
    if kw.get("witness") is not None:
        kw["witness_kind"] = {
            Status.FALSIFIED: "within-eps",
            Status.UNKNOWN: "closest-found",
        }.get(status, "closest")
    kw["seconds"] = time.perf_counter() - t0
    return _result(ctx, i, idx[i], lab[i], pred[i], names, status=status, **kw)
