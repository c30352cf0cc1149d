r"""Best-first branch and bound on ReLU splits for the exact W1 radius.

Problem (SPEC section 4, Theorem 6): ``r* = min_{t≠y} min {‖g‖₁ : g ∈ P, f_t(δµ+g) ≥
f_y(δµ+g)}``.  Nodes are ``(target t, splits)``; a node's lower bound is the safe dual
bound of its LP relaxation (:mod:`._relaxlp`) with intermediate bounds from the engine
(:func:`~.chain_bounds.relu_bounds`) over ``P_U`` (``U`` the incumbent radius), refreshed
below every split.
The open node with the smallest bound is expanded: the unstable neuron whose relaxation
the LP exploits most (``a_j - relu(z_j)``, weighted by the dual of its triangle row) is
split into ``z_j ≥ 0`` / ``z_j ≤ 0``.  When an LP solution satisfies every ReLU, the
LP value is exact for its node and a verified witness is extracted (the same LP restricted
to the solution's linear region with margin ``f_t - f_y ≥ κ``).  Upper bounds come from
every LP solution checked by an exact forward pass, and from a local search over linear
regions (region LP, then flips of the neurons whose sign constraints block it).

Searches over growing radii (:meth:`_Solver.run`): bounds over the ball of the incumbent
radius ``U`` are loose when ``U`` is far above ``r*`` (the attacks' adversarials often are
1.5-2x the proven radius), so the radius is raised from a proven lower bound ``L`` (the
caller's incomplete radius) by searches over ``P_ε``, ``ε = L(1 + s)``, each restricted
to the ball ``‖g‖₁ ≤ ε``.  A search that closes every node proves ``r* ≥ ε``; nodes closed
there say nothing beyond ``ε``, so every proven bound is capped by the search radius.

Termination: ``U - L ≤ rtol·U`` with ``L`` the minimum bound over open nodes and over
leaves closed within tolerance (and at most the search radius); otherwise, at the
deadline, the best such ``L`` is returned as the proven lower bound.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from flowverify.verification._bab_nodes import _Branching, _Node
from flowverify.verification._bab_witness import (
    linearised_attack,
    repair_feasibility,
    verify_witness,
)
from flowverify.verification._exact import ExactStatus
from flowverify.verification._relaxlp import Problem, RelaxationLP
from flowverify.verification.chain_bounds import lp_image_form, relu_bounds

__all__ = ["BabOutcome", "branch_and_bound"]

logger = logging.getLogger(__name__)


@dataclass
class BabOutcome:
    status: str
    lower: float
    upper: float
    witness: np.ndarray | None
    target: int | None
    nodes: int
    message: str = ""
    stats: dict = field(default_factory=dict)


class _Solver(_Branching):
    def __init__(
        self,
        prob: Problem,
        *,
        deadline,
        rtol,
        kappa,
        refresh,
        max_region_flips,
        log_every,
        branching="babsr",
        strong=1,
        stepped=True,
        step_nodes=64,
        step=0.1,
    ):
        self.stepped = stepped
        self.step = float(step)
        self.warm = True  # children start from the parent's LP basis
        self.root_basis: dict = {}
        self.step_nodes = max(1, int(step_nodes))
        self.branching = branching
        self.strong = max(1, int(strong))
        self.prob = prob
        self.deadline = deadline
        self.rtol = rtol
        self.kappa = kappa
        self.refresh = refresh
        self.max_region_flips = max_region_flips
        self.log_every = log_every
        self.targets = [t for t in range(prob.num_classes) if t != prob.label]
        self.best = math.inf
        self.best_delta = None
        self.best_target = None
        self.lps: dict[int, RelaxationLP] = {}
        self.nodes = 0
        self.lp_solves = 0
        self.seq = itertools.count()
        self.closed_min = math.inf
        self.t0 = time.perf_counter()

    # -------------------------------------------------------------- helpers
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def consider(self, delta: np.ndarray, target: int | None, source: str) -> bool:
        """Check a candidate adversarial flow; keep it if verified and better."""
        g = delta - self.prob.delta_mu
        g2 = repair_feasibility(self.prob, g)
        if g2 is None:
            return False
        delta = self.prob.delta_mu + g2
        ok, margin = verify_witness(self.prob, delta)
        if not ok:
            return False
        dist = float(np.abs(g2).sum())
        if dist < self.best:
            logits = self.prob.forward(delta)
            t = int(np.argmax(np.delete(logits, self.prob.label)))
            t = t + (t >= self.prob.label)
            logger.debug("incumbent %.9g -> %.9g (%s, target %s)", self.best, dist, source, t)
            self.best, self.best_delta, self.best_target = dist, delta, t
            self._sync_radius()
            return True
        return False

    def _bounds(self, radius: float):
        return relu_bounds(self.prob, radius)

    def _sync_radius(self) -> None:
        """Every LP's ball row: ``min(U, ε)``, the incumbent and the search radius (the
        intermediate bounds hold over ``P_ε`` only)."""
        for lp in self.lps.values():
            lp.set_radius(min(self.best, self.radius))

    def _lp(self, target: int) -> RelaxationLP:
        lp = self.lps.get(target)
        if lp is None:
            # boxed by the largest radius ever searched, the ball row follows ``ε``
            lp = RelaxationLP(
                self.prob,
                target,
                self.cap,
                self.root_bounds,
                v_img=self.v_img,
                resid=self.resid,
            )
            lp.set_radius(min(self.best, self.radius))
            self.lps[target] = lp
        return lp

    def _solve(self, target, bounds, splits, kappa=0.0, basis=None):
        lp = self._lp(target)
        lp.set_node(bounds, splits)
        lp.set_margin(kappa)
        if basis is not None and self.warm:
            lp.h.setBasis(basis)  # the parent's optimal basis: one split away
        rem = self.remaining()
        if rem <= 0:
            return "unknown", -math.inf, None, lp
        lp.set_time_limit(rem)
        self.lp_solves += 1
        st, lb, x = lp.solve()
        return st, lb, x, lp

    def _hint(self, lp: RelaxationLP, x):
        y = lp.row_duals()
        out = []
        for k, n in enumerate(self.prob.hidden):
            z, a = lp.layer_values(x, k)
            tri = np.abs(y[lp.row_tri[k] : lp.row_tri[k] + n])
            out.append((z.copy(), a.copy(), tri))
        return out

    # -------------------------------------------------------------- primal heuristics

    # -------------------------------------------------------------- branch and bound

    def lower(self, heap) -> float:
        """Proven lower bound of the current search: nodes closed by the ball row or by
        bounds over ``P_ε`` prove nothing beyond the search radius ``ε``."""
        lo = min(self.closed_min, self.best, self.radius)
        if heap:
            lo = min(lo, heap[0].lb)
        return lo

    def set_radius(self, radius):
        """(Re)compute the root bounds over ``P_radius`` and tighten the open nodes."""
        self.radius = min(radius, self.cap)
        self._sync_radius()
        self.root_bounds = self._bounds(self.radius)
        logger.debug(
            "root bounds (U=%.6g): unstable per layer %s",
            radius,
            [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in self.root_bounds],
        )

    def root(self):
        """Evaluate the root node of every target; returns the open nodes."""
        prob = self.prob
        zero = [np.zeros(n, np.int8) for n in prob.hidden]
        out = []
        for t in self.targets:
            if self.remaining() <= 0:
                return None
            node = self.evaluate(
                t, self.root_bounds, [s.copy() for s in zero], 0.0, 0, self.root_basis.get(t)
            )
            if node is not None:
                out.append(node)
                if node.basis is not None:
                    self.root_basis[t] = node.basis  # the next search's root starts here
        return out

    def prepare(self, radius) -> None:
        """Fix the largest radius ever searched (``cap``, the box of every LP) and the
        input domain over it; :meth:`search` may then run at any ``ε <= cap``."""
        self.cap = self.radius = radius
        self.v_img, self.resid = lp_image_form(self.prob)

    def run(self, radius, lower_hint):
        """Raise a proven lower bound ``L`` towards the incumbent ``U`` by searches over
        growing radii ``ε`` (:meth:`search`), then close the gap at ``ε = U``.

        Intermediate bounds over ``P_ε`` are much tighter than over ``P_U`` when the
        incumbent is far from ``r*``: a search that closes every node proves ``r* ≥ ε``;
        one that finds an adversarial below ``ε`` lowers ``U`` and goes on as the exact
        search.  Radii grow by relative steps, ``ε = L(1 + s)``; after a search cut at its
        node budget, ``s`` is divided by 3 and the budget doubled (the next search starts
        again at the roots: continuing the cut tree, whose splits and bounds were made for
        the larger radius, was measured slower); ``s`` grows 1.5x after a closed search.
        The last search (``ε ≥ 95%`` of ``U``, or ``L`` unknown) runs to the deadline.
        """
        self.prepare(radius)
        if not math.isfinite(self.best) and self.prob.hidden:
            linearised_attack(self, budget=0.25 * max(self.remaining(), 0.0))
        proven = 0.0
        hint = lower_hint if 0.0 < lower_hint < min(radius, self.best) else 0.0
        step, budget = self.step, self.step_nodes
        heap: list | None = None
        while True:
            upper = min(radius, self.best)
            low = max(proven, hint)
            final = not self.stepped or low <= 0.0 or step <= 0.0
            eps = upper if final else low * (1.0 + step)
            if eps >= 0.95 * upper:
                final, eps = True, upper
            heap = self.search(eps, None if final else budget)
            if heap is None:  # deadline during the roots: nothing proven in this search
                heap = [_Node(0.0, next(self.seq), -1, [], [], None)]
                break
            done = not heap or heap[0].lb >= self.best * (1 - self.rtol)
            proven = max(proven, self.lower(heap))
            logger.debug(
                "search eps=%.6g (%s): %s, proven %.6g, upper %.6g, %d nodes",
                eps,
                "final" if final else f"step {step:.3g}, budget {budget}",
                "closed" if done else "cut",
                proven,
                self.best,
                self.nodes,
            )
            if final or self.remaining() <= 0:
                break
            if math.isfinite(self.best) and self.best - proven <= self.rtol * self.best:
                heap = []
                break
            if done:
                step *= 1.5
            else:
                step, budget = step / 3.0, budget * 2
                if step < 1e-3:
                    step = 0.0  # steps too small to help: search the whole gap
        return self.finish(heap, lower_hint, proven)

    def search(self, eps, max_nodes):
        """Best-first search for ``min ‖g‖₁`` over ``P_ε`` (pruning at ``min(U, ε)``),
        from the roots, for at most ``max_nodes`` expansions (None: to the deadline).

        Returns the open nodes (empty when closed; the proven bound is
        :meth:`lower`), or None if the deadline came while evaluating the roots.
        """
        self.closed_min = math.inf
        self.set_radius(min(eps, self.best))
        # root nodes; improve the incumbent from their LP solutions; re-bound if it helps
        for _ in range(4):
            order = self.root()
            if order is None:
                return None
            before = self.best
            for node in sorted(order):
                if node.lb < self.best and self.remaining() > 0:
                    self.region_search_from_node(node)
            if self.best < 0.9 * self.radius and self.remaining() > 0:
                self.set_radius(self.best)
                continue
            if self.best >= before:
                break
        heap = [n for n in order if n.lb < min(self.best, self.radius)]
        heapq.heapify(heap)
        return self._expand_loop(heap, max_nodes)

    def _tighten(self, nodes) -> None:
        """Intersect the nodes' bounds with the root bounds (both hold on ``P_ε``)."""
        for n in nodes:
            n.bounds = [
                (np.maximum(lo, rl), np.minimum(hi, rh))
                for (lo, hi), (rl, rh) in zip(n.bounds, self.root_bounds, strict=True)
            ]

    def _expand_loop(self, heap, max_nodes):
        last_log = time.perf_counter()
        expanded = 0
        while heap:
            if heap[0].lb >= self.best * (1 - self.rtol):
                break
            if self.remaining() <= 0 or (max_nodes is not None and expanded >= max_nodes):
                break
            node = heapq.heappop(heap)
            if node.lb >= min(self.best, self.radius):
                continue
            self.nodes += 1
            expanded += 1
            self.expand(node, heap)
            if self.nodes % 25 == 0 and heap and self.remaining() > 0:
                self.region_search_from_node(heap[0])
                if self.best < 0.9 * self.radius:
                    self.set_radius(self.best)
                    self._tighten(heap)
            if self.log_every and time.perf_counter() - last_log > self.log_every:
                last_log = time.perf_counter()
                logger.info(
                    "bab: eps %.6g, %d nodes, %d open, lower %.6g, upper %.6g, %.1fs",
                    self.radius,
                    self.nodes,
                    len(heap),
                    self.lower(heap),
                    self.best,
                    time.perf_counter() - self.t0,
                )
        return heap

    def region_search_from_node(self, node: _Node):
        lp = self._lp(node.target)
        st, _, x, lp = self._solve(node.target, node.bounds, node.splits)
        if st == "optimal":
            self.region_search(node.target, self.prob.delta_mu + lp.flow(x), node.bounds)

    def _open_status(self) -> ExactStatus:
        """A search that ended with the gap open: out of time, or restricted to a radius."""
        return ExactStatus.TIMEOUT if self.remaining() <= 0 else ExactStatus.BOUNDED

    def finish(self, heap, lower_hint, proven=0.0) -> BabOutcome:
        lower = max(self.lower(heap), min(proven, self.best))
        if lower_hint > lower and lower_hint <= self.best:
            lower = lower_hint  # a proven bound from the caller
        stats = {"lp_solves": self.lp_solves, "open": len(heap), "radius": self.radius}
        if self.best_delta is None:
            if not heap and not math.isfinite(self.closed_min) and self.radius >= self.cap:
                return BabOutcome(
                    ExactStatus.INFEASIBLE,
                    math.inf,
                    math.inf,
                    None,
                    None,
                    self.nodes,
                    "no adversarial within the search radius",
                    stats,
                )
            return BabOutcome(
                self._open_status(),
                lower,
                math.inf,
                None,
                None,
                self.nodes,
                "no adversarial found",
                stats,
            )
        gap_ok = self.best - lower <= self.rtol * self.best + 1e-12
        status = ExactStatus.OPTIMAL if gap_ok else self._open_status()
        return BabOutcome(
            status,
            min(lower, self.best),
            self.best,
            self.best_delta,
            self.best_target,
            self.nodes,
            "",
            stats,
        )


def branch_and_bound(
    prob: Problem,
    *,
    radius: float,
    deadline: float,
    rtol: float = 1e-6,
    kappa: float = 1e-9,
    incumbent: np.ndarray | None = None,
    lower_hint: float = 0.0,
    refresh: bool = True,
    max_region_flips: int = 20,
    log_every: float = 0.0,
    branching: str = "babsr",
    strong: int = 1,
    stepped: bool = True,
    step_nodes: int = 64,
    step: float = 0.1,
) -> BabOutcome:
    """Exact minimum distance by best-first BaB (module docstring).

    Parameters
    ----------
    prob : Problem
    radius : float
        Search radius ``U`` (the incumbent's distance, or a bound on the distance of any
        adversarial of interest); intermediate bounds hold over ``P_U``.
    deadline : float
        ``time.perf_counter()`` value at which to stop.
    rtol : float
        Relative optimality tolerance.
    kappa : float
        Witness margin: witnesses satisfy ``f_t - f_y ≥ κ`` in the LP (verified ``> 0``).
    incumbent : ndarray, optional
        A flow already verified adversarial.
    lower_hint : float
        A lower bound proven by the caller; reported if better, and (``stepped``) the
        start of the searches over growing radii.
    stepped : bool
        Raise the lower bound by searches over radii between it and the incumbent
        (:meth:`_Solver.run`); False: one search over ``P_U``.
    step_nodes : int
        Node budget of the first such search (doubled after each cut).
    step : float
        First relative step: ``ε = L(1 + step)``; x1.5 after a closed search, /3 after
        a cut one.
    """
    solver = _Solver(
        prob,
        deadline=deadline,
        rtol=rtol,
        kappa=kappa,
        refresh=refresh,
        max_region_flips=max_region_flips,
        log_every=log_every,
        branching=branching,
        strong=strong,
        stepped=stepped,
        step_nodes=step_nodes,
        step=step,
    )
    if incumbent is not None:
        solver.consider(np.asarray(incumbent, float), None, "hint")
    if math.isfinite(solver.best):
        radius = min(radius, solver.best)
    out = solver.run(radius, lower_hint)
    out.stats["seconds"] = time.perf_counter() - solver.t0
    return out
