"""Cost of one branch-and-bound search over ``P_ε`` as ``ε`` grows (complete certifier).

For one bundled digit and the bundled ``fc`` model, runs the searches of
:mod:`flowverify.verification._bab` at fixed radii ``ε = k · r_feasible`` (``r_feasible`` the
feasible CROWN radius) and prints, per radius, whether the search closed (a proof of
``r* ≥ ε``) within the node budget, the nodes expanded, the LPs solved, the simplex
iterations, and the seconds, once with children warm-started from their parent's LP basis
and once from whatever basis the solver last had.  Also prints the closest adversarial
found by the default minimal-radius PGD attack, as a multiple of ``r_feasible``.

Examples
--------
::

    python benchmarks/bench_bab_search.py --cold             # digit 1, k = 1.1 ... 1.37
    python benchmarks/bench_bab_search.py --index 0 --factors 1.2,1.4 --budget 500
    python benchmarks/bench_bab_search.py --factors 1.35 --tighten --milp 600
    python benchmarks/bench_bab_search.py --factors 1.29 \
        --lp-option simplex_dual_edge_weight_strategy=1       # Devex pricing

``--tighten`` repeats each search with the unstable neurons' intermediate bounds at the
root tightened by LP (min/max of each pre-activation over the triangle relaxation over
``P_ε``, layer by layer): the best single-neuron intermediate bounds, against the
CROWN/Kantorovich ones the certifier uses.  ``--milp SECONDS`` decides the same radius
with HiGHS's own branch and cut on the big-M MILP (:mod:`flowverify.verification._milp`,
bounds over ``P_ε``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import highspy
import numpy as np
import torch

import flowverify
from flowverify.io.bundled import bundled_digits
from flowverify.model.flow_model import FlowModel
from flowverify.model.loading import load_model
from flowverify.transport.flows import inverse_flow
from flowverify.transport.references import make_reference
from flowverify.verification import _bab, _relaxlp
from flowverify.verification._chain import affine_chain
from flowverify.verification._exact import _block_incidence
from flowverify.verification._milp import milp_exact
from flowverify.verification.checks import INVERSE_METHOD

ITERATIONS = {"simplex": 0}


def _counting_solve(solve):
    @functools.wraps(solve)
    def wrapper(self):
        out = solve(self)
        ITERATIONS["simplex"] += int(self.h.getInfo().simplex_iteration_count)
        return out

    return wrapper


def _with_options(init, options):
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name, value in options:
            self.h.setOptionValue(name, int(value))

    return wrapper


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=int, default=1, help="bundled digit (default 1)")
    p.add_argument("--factors", default="1.1,1.29,1.35,1.37", help="ε / feasible radius")
    p.add_argument("--budget", type=int, default=256, help="node budget per search")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--branching", default="babsr", help="babsr, gap or product")
    p.add_argument("--strong", type=int, default=1, help="branching candidates tried per node")
    p.add_argument("--cold", action="store_true", help="also without warm starts")
    p.add_argument("--tighten", action="store_true", help="also with LP-tightened root bounds")
    p.add_argument("--milp", type=float, default=0.0, help="also HiGHS's MILP, seconds limit")
    p.add_argument(
        "--lp-option",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="a HiGHS option of every node LP, e.g. simplex_dual_edge_weight_strategy=1 "
        "(Devex pricing); repeatable",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _relaxlp.RelaxationLP.solve = _counting_solve(_relaxlp.RelaxationLP.solve)
    if args.lp_option:
        _relaxlp.RelaxationLP.__init__ = _with_options(
            _relaxlp.RelaxationLP.__init__, [o.split("=", 1) for o in args.lp_option]
        )

    model = load_model("fc")
    x, y = bundled_digits()
    i = args.index
    img = x[i].astype(np.float64)
    mass = float(img.sum())
    feas = flowverify.certify(model, x[i : i + 1], y[i : i + 1], method="feasible")[0]
    pgd = flowverify.attack(model, x[i : i + 1], y[i : i + 1])
    r_f = feas.radius * mass  # raw units: flow L1
    print(f"# digit {i} (label {int(y[i])}), feasible radius {feas.radius:.5f} (normalised)")
    if bool(np.asarray(pgd.success)[0]):
        w1 = float(np.asarray(pgd.w1)[0])
        print(f"# closest PGD adversarial {w1:.5f} = {w1 / feas.radius:.2f}x feasible")

    m64 = model.double()
    ref = make_reference("uniform", img)
    chain = affine_chain(FlowModel(m64, torch.as_tensor(ref), fuse=True), 0)
    dmu = np.asarray(inverse_flow(ref, img, method=INVERSE_METHOD), dtype=np.float64)
    prob = _relaxlp.Problem(
        [np.asarray(w, dtype=np.float64) for w in chain.weights],
        [np.asarray(b, dtype=np.float64) for b in chain.biases],
        dmu.reshape(-1),
        ref.reshape(-1),
        int(y[i]),
        height=28,
        width=28,
        channels=1,
        feasible=True,
        amat=_block_incidence(28, 28, 1),
    )
    factors = [float(f) for f in args.factors.split(",")]
    cap = max(factors) * r_f
    print(
        "| eps / feasible | warm start | root bounds | unstable (layers) | result | nodes "
        "| LPs | simplex iterations | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    modes = [(True, False)]
    if args.cold:
        modes.append((False, False))
    if args.tighten:
        modes.append((True, True))
    for warm, tighten in modes:
        for k in factors:
            solver = _bab._Solver(
                prob,
                deadline=time.perf_counter() + 600,
                rtol=1e-6,
                kappa=1e-9,
                refresh=True,
                max_region_flips=20,
                log_every=0,
                branching=args.branching,
                strong=args.strong,
            )
            solver.warm = warm
            solver.prepare(cap)
            unstable = []
            crown = solver._bounds

            def root_bounds(radius, solver=solver, crown=crown, tighten=tighten, out=unstable):
                b = crown(radius)
                if tighten:
                    b = _lp_tightened(prob, solver, b, radius)
                out[:] = [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in b]
                return b

            solver._bounds = root_bounds
            ITERATIONS["simplex"] = 0
            t0 = time.perf_counter()
            heap = solver.search(k * r_f, args.budget)
            secs = time.perf_counter() - t0
            closed = heap is not None and not heap
            print(
                f"| {k:.3g} | {'yes' if warm else 'no'} | {'LP' if tighten else 'CROWN'} | "
                f"{'/'.join(map(str, unstable))} | "
                f"{'closed' if closed else 'cut'} | {solver.nodes} | {solver.lp_solves} | "
                f"{ITERATIONS['simplex']} | {secs:.1f} |",
                flush=True,
            )
    if args.milp > 0:
        print("\n| eps / feasible | HiGHS MILP | MILP nodes | s |\n|---|---|---|---|")
        for k in factors:
            t0 = time.perf_counter()
            res = milp_exact(
                prob,
                radius=k * r_f,
                deadline=t0 + args.milp,
                rtol=1e-6,
                kappa=1e-9,
                incumbent=None,
                t0=t0,
            )
            secs = time.perf_counter() - t0
            if res.witness_flow is not None:
                verdict = f"adversarial at {res.upper / r_f:.3g}x"
            elif res.solver_status != "milp: time limit":
                verdict = "closed"
            else:
                verdict = f"time limit (lower {res.lower / r_f:.3g}x)"
            print(f"| {k:.3g} | {verdict} | {res.nodes} | {secs:.1f} |", flush=True)
    return 0


def _lp_tightened(prob, solver, bounds, radius):
    """Root bounds with each unstable neuron's ``l``/``u`` replaced by the LP min/max of
    its pre-activation over the triangle relaxation over ``P_radius`` (safe dual bounds),
    layer by layer (a layer's tightened bounds shape the next layer's triangles)."""
    lp = _relaxlp.RelaxationLP(
        prob, solver.targets[0], solver.cap, bounds, v_img=solver.v_img, resid=solver.resid
    )
    lp.set_radius(radius)
    h = lp.h
    h.changeRowBounds(lp.row_margin, -highspy.kHighsInf, highspy.kHighsInf)  # no margin
    zero = [np.zeros(n, np.int8) for n in prob.hidden]
    bounds = [(lo.copy(), hi.copy()) for lo, hi in bounds]
    every = np.arange(lp.ncol, dtype=np.int32)
    for k in range(len(prob.hidden)):
        lp.set_node(bounds, zero)
        lo, hi = bounds[k]
        for j in np.nonzero((lo < 0) & (hi > 0))[0]:
            for sgn in (1.0, -1.0):
                cost = np.zeros(lp.ncol)
                cost[lp.zoff[k] + j] = sgn
                h.changeColsCost(lp.ncol, every, cost)
                h.run()
                if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                    continue
                y = np.asarray(h.getSolution().row_dual)
                v = max(lp.safe_bound(y, cost=cost), lp.safe_bound(-y, cost=cost))
                if sgn > 0:
                    lo[j] = max(lo[j], v)
                else:
                    hi[j] = min(hi[j], -v)
    return bounds


if __name__ == "__main__":
    sys.exit(main())
