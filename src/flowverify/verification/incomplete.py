"""Incomplete certification of a batch: CROWN or alpha-CROWN on the engine over the W1
ball (Theorem 3, ``vanilla``) or the W1 polytope (Theorem 6, ``feasible``), or the LP
relaxation over the polytope (Lemma 5); the largest certified radius by a search on ``ε``,
or a decision at a fixed ``ε`` (a Frank-Wolfe attack may falsify it).
"""

from __future__ import annotations

import numpy as np

from flowverify.core.results import Status
from flowverify.transport.flows import w1_distance
from flowverify.verification import search as _search
from flowverify.verification.checks import _e_max
from flowverify.verification.context import (
    _build_ref,
    _Ctx,
    _deadline,
    _eps_raw,
    _mass,
    _result,
)
from flowverify.verification.falsify import _fw_attack, _model_margins

# ---------------------------------------------------------------- incomplete (batched)


def _lp_radii(ctx: _Ctx, x, refs, labels, eps_raw, lower):
    """Raw radii ``(n,)`` and convergence flags of the ``lp`` certifier (one reference
    slot): the LP relaxation over the polytope on the fused chain, searched from the
    engine's radius ``lower`` (radius mode) or evaluated at ``ε`` (``eps`` mode)."""
    from flowverify.verification.engine import EngineProblem, make_domain
    from flowverify.verification.lp import LPOracle, chain_problems

    probs = chain_problems(ctx.model64, x, refs, labels, input_scale=ctx.input_scale)
    n = len(x)
    e_max = _e_max(x)
    inv = 1.0 / x.sum(axis=(-2, -1)) if ctx.input_scale == "normalised" else None
    eng = EngineProblem(
        ctx.graph, x, labels, make_domain("w1-polytope", x), inv_scale=inv, device=ctx.device
    )
    if eps_raw is not None:
        best = lower.copy()
        todo = np.flatnonzero(best < eps_raw)
        if todo.size:
            f_val = LPOracle(probs, eng)(todo, eps_raw[todo])
            val = np.minimum(np.maximum(np.minimum(f_val, eps_raw[todo]), 0.0), e_max[todo])
            best[todo] = np.maximum(best[todo], val)
        return best, np.ones(n, dtype=bool)
    if not probs[0].hidden:  # polytope CROWN is already exact (Lemma 8) on a linear model
        return lower, np.ones(n, dtype=bool)
    res = _search.search_radius(
        LPOracle(probs, eng),
        e_max,
        rtol=ctx.rtol,
        deadline=_deadline(ctx, n),
        lower_init=lower,
    )
    return np.maximum(res.lower, lower), res.converged


def _engine_radii(ctx: _Ctx, x, labels, eps_raw, *, method=None, certifier=None):
    """Raw radii ``(n,)`` and convergence flags from the bound-propagation engine.

    Vanilla: the W1 ball (Theorem 3); feasible: the ball's search first, then the W1
    polytope (Theorem 6) from its radius, so feasible is never below vanilla;
    ``alpha-crown`` adds a last stage with optimised slopes.  ``eps`` mode:
    ``min(ε, F(ε))`` maximised over the stages.
    """
    from flowverify.verification.engine import EngineProblem, make_domain

    method = ctx.method if method is None else method
    certifier = ctx.certifier if certifier is None else certifier
    n = len(x)
    inv = 1.0 / x.sum(axis=(-2, -1)) if ctx.input_scale == "normalised" else None
    domains = ["w1-ball"] + (["w1-polytope"] if method == "feasible" else [])
    e_max = _e_max(x)
    best, conv = np.zeros(n), np.ones(n, dtype=bool)
    deadline = None if eps_raw is not None else _deadline(ctx, n)
    linear = not ctx.graph.activations()  # F(ε) does not depend on ε (Lemmas 7, 8)
    stages = [(d, False) for d in domains]
    if certifier == "alpha-crown" and not linear:
        stages.append((domains[-1], True))
    for k, (name, optimise) in enumerate(stages):
        prob = EngineProblem(
            ctx.graph,
            x,
            labels,
            make_domain(name, x),
            inv_scale=inv,
            device=ctx.device,
            optimise=optimise,
        )
        if eps_raw is not None:
            todo = np.flatnonzero(best < eps_raw)
            if todo.size:
                f_val = prob(todo, eps_raw[todo])
                val = np.minimum(np.maximum(np.minimum(f_val, eps_raw[todo]), 0.0), e_max[todo])
                best[todo] = np.maximum(best[todo], val)
            continue
        res = _search.search_radius(
            prob,
            e_max,
            linear=linear,
            rtol=ctx.rtol,
            deadline=deadline,
            lower_init=best if k else None,
        )
        better = res.lower >= best
        conv = np.where(better, res.converged, conv) if k else res.converged
        best = np.maximum(best, res.lower)
    return best, conv


def _incomplete_results(ctx, x, lab, pred, idx, ref_sets, ok, eps, unit):
    mass = _mass(x[ok])
    eps_raw = None if eps is None else np.array([_eps_raw(eps, unit, m) for m in mass])
    n_refs = len(ref_sets[ok[0]])
    radii = np.zeros((n_refs, ok.size))
    conv = np.ones((n_refs, ok.size), dtype=bool)
    # No certifier here depends on the reference (module docstring): the engine works on
    # images, and the LP over the fused chain of any reference has the same optimum.  So
    # one computation fills every reference's slot.
    lp = ctx.certifier == "lp"
    radii[:], conv[:] = _engine_radii(
        ctx, x[ok], lab[ok], eps_raw, certifier="crown" if lp else ctx.certifier
    )
    if lp:  # the LP reads the fused chain of the first reference
        refs = np.stack([_build_ref(ref_sets[i][0], x[i]) for i in ok])
        radii[:], conv[:] = _lp_radii(ctx, x[ok], refs, lab[ok], eps_raw, radii[0].copy())
    best = radii.argmax(axis=0)
    out = {}
    fals = np.zeros(ok.size, dtype=bool)
    adv = None
    if eps_raw is not None:
        cert = radii.max(axis=0) >= eps_raw
        todo = np.flatnonzero(~cert)
        if todo.size:
            margin_fn = _model_margins(ctx, lab[ok[todo]])
            f_ok, f_img = _fw_attack(ctx, margin_fn, x[ok[todo]], lab[ok[todo]], eps_raw[todo])
            fals[todo] = f_ok
            adv = dict(zip(todo.tolist(), f_img, strict=True))
    for k, i in enumerate(ok):
        names = [r.name for r in ref_sets[i]]
        r_raw = float(radii[best[k], k])
        per_ref = {nm: float(radii[j, k] / mass[k]) for j, nm in enumerate(names)}
        kw = dict(
            radius=r_raw / mass[k],
            radius_raw=r_raw,
            per_reference=per_ref,
            lower=r_raw / mass[k],
            mass=float(mass[k]),
            best_reference=names[best[k]],
            converged=bool(conv[best[k], k]),
        )
        if eps_raw is None:
            timed_out = ctx.timeout is not None and not kw["converged"]
            status = Status.CERTIFIED if r_raw > 0 and not timed_out else Status.UNKNOWN
            if timed_out:
                kw["message"] = "time limit reached: radius is the proven lower bound so far"
            elif not kw["converged"]:
                kw["message"] = (
                    f"radius search stopped at its probe limit before reaching rtol={ctx.rtol}:"
                    " radius is the largest radius certified so far"
                )
            elif r_raw <= 0:
                kw["message"] = "the relaxation certifies no positive radius"
        else:
            kw.update(eps=float(eps_raw[k] / mass[k]), eps_raw=float(eps_raw[k]))
            if r_raw >= eps_raw[k]:
                status = Status.CERTIFIED
            elif fals[k]:
                status = Status.FALSIFIED
                img = adv[k]
                w1 = float(w1_distance(img, x[i], unit="raw"))
                kw.update(witness=img, upper=w1 / mass[k], upper_raw=w1, witness_kind="within-eps")
            else:
                status = Status.UNKNOWN
        out[i] = _result(ctx, i, idx[i], lab[i], pred[i], names, status=status, **kw)
    return out
