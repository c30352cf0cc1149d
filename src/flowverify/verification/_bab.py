r"""Best-first branch and bound on ReLU splits for the exact W1 radius.

Problem (SPEC section 4, Theorem 6): ``r* = min_{t≠y} min {‖g‖₁ : g ∈ P, f_t(δµ+g) ≥
f_y(δµ+g)}``.  Nodes are ``(target t, splits)``; a node's lower bound is the safe dual
bound of its LP relaxation (:mod:`._relaxlp`) with intermediate bounds from
:mod:`._propagate` over ``P_U`` (``U`` the incumbent radius), refreshed below every split.
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

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.verification._highs import new_highs, set_time_limit
from flowverify.verification._propagate import effective, layer_bounds
from flowverify.verification._relaxlp import Problem, RelaxationLP
from flowverify.verification._w1ball import problem_domain

__all__ = ["BabOutcome", "branch_and_bound", "verify_witness"]

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


@dataclass(order=True)
class _Node:
    lb: float
    seq: int
    target: int = field(compare=False)
    splits: list = field(compare=False)
    bounds: list = field(compare=False)
    hint: list | None = field(compare=False)  # (z, a, tri_dual) per layer from the LP
    depth: int = field(compare=False, default=0)
    basis: object = field(compare=False, default=None)  # HiGHS basis of the node's LP


class _Solver:
    def __init__(
        self,
        prob: Problem,
        *,
        deadline,
        rtol,
        kappa,
        bound_fn,
        chain,
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
        self.bound_fn = bound_fn
        self.chain = chain
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
        prob = self.prob
        dom = self.domain.with_radius(radius)
        b = layer_bounds(prob.weights, prob.biases, prob.c1, dom)
        if self.bound_fn is not None and self.chain is not None:
            try:
                extra = self.bound_fn(
                    self.chain, prob.delta_mu, prob.reference, radius, feasible=prob.feasible
                )
                b = [
                    (np.maximum(lo, np.asarray(el, float)), np.minimum(hi, np.asarray(eh, float)))
                    for (lo, hi), (el, eh) in zip(b, extra, strict=True)
                ]
            except Exception as exc:  # noqa: BLE001 - optional helper, never fatal
                raise_if_interrupted(exc)
                logger.warning("bound_fn failed (%s); using the built-in bounds", exc)
        return b

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
    def region_search(self, target, delta, bounds):
        """Local search over linear regions starting from the region of ``delta``."""
        prob = self.prob
        pre = prob.pre_activations(delta)
        splits = [np.where(z > 0, 1, -1).astype(np.int8) for z in pre]
        # respect the node bounds: a neuron proven stable keeps its sign
        for k, (lo, hi) in enumerate(bounds):
            splits[k] = np.where(lo >= 0, 1, np.where(hi <= 0, -1, splits[k])).astype(np.int8)
        st, _, x, lp = self._solve(target, bounds, splits, kappa=self.kappa)
        if st != "optimal":
            return
        self.consider(prob.delta_mu + lp.flow(x), target, "region")
        cur = float(np.abs(lp.flow(x)).sum())
        for _ in range(self.max_region_flips):
            if self.remaining() <= 0:
                break
            dual = lp.col_duals()
            cand = []
            for k, n in enumerate(prob.hidden):
                zo = lp.zoff[k]
                z = x[zo : zo + n]
                d = dual[zo : zo + n]
                lo, hi = bounds[k]
                free = (lo < 0) & (hi > 0)
                at_zero = free & (np.abs(z) <= 1e-9 * (1 + np.abs(hi - lo)))
                for j in np.nonzero(at_zero & (np.abs(d) > 1e-12))[0]:
                    cand.append((abs(d[j]), k, j))
            if not cand:
                break
            cand.sort(reverse=True)
            improved = False
            for _, k, j in cand[:3]:
                trial = [s.copy() for s in splits]
                trial[k][j] = -trial[k][j]
                st, _, x2, lp = self._solve(target, bounds, trial, kappa=self.kappa)
                if st != "optimal":
                    continue
                val = float(np.abs(lp.flow(x2)).sum())
                if val < cur - 1e-12 * (1 + cur):
                    splits, x, cur = trial, x2, val
                    self.consider(prob.delta_mu + lp.flow(x), target, "region-flip")
                    improved = True
                    break
            if not improved:
                break

    # -------------------------------------------------------------- branch and bound
    def branch_candidates(self, node: _Node, count: int):
        """Up to ``count`` unstable neurons ``(k, j)``, best first.

        Score: ``(a_j - relu(z_j)) · (y_j + 1e-6)`` at the node's LP solution (how much
        the relaxation of neuron ``j`` is used, weighted by the dual ``y_j`` of its
        triangle row); neurons with no slack come last, by ``min(u, -l)``.
        """
        scored, fallback = [], []
        for k, (lo, hi) in enumerate(node.bounds):
            lo_e, hi_e = effective(lo, hi, node.splits[k])
            free = (lo_e < 0) & (hi_e > 0) & (node.splits[k] == 0)
            if not free.any():
                continue
            idx = np.nonzero(free)[0]
            width = np.minimum(hi_e, -lo_e)[idx]
            fallback.extend(zip(width.tolist(), [k] * idx.size, idx.tolist(), strict=True))
            if node.hint is None:
                continue
            z, a, tri = node.hint[k]
            gap = (a - np.maximum(z, 0.0))[idx]
            if self.branching == "gap":
                score = gap
            elif self.branching == "babsr":
                score = tri[idx] * (hi_e * -lo_e / (hi_e - lo_e))[idx] + 1e-9 * gap
            else:
                score = gap * (tri[idx] + 1e-6)
            ok = gap > 1e-9
            scored.extend(
                zip(score[ok].tolist(), [k] * int(ok.sum()), idx[ok].tolist(), strict=True)
            )
        scored.sort(reverse=True)
        fallback.sort(reverse=True)
        out = [(k, j) for _, k, j in scored[:count]]
        if len(out) < count:
            seen = set(out)
            out += [(k, j) for _, k, j in fallback if (k, j) not in seen][: count - len(out)]
        return out

    def child_bounds(self, parent: _Node, splits, k):
        if not self.refresh or k + 1 >= len(self.prob.hidden):
            return parent.bounds
        dom = self.domain.with_radius(min(self.radius, self.best), iters=40)
        return layer_bounds(
            self.prob.weights,
            self.prob.biases,
            self.prob.c1,
            dom,
            splits=splits,
            prev=parent.bounds,
            start=k + 1,
        )

    def expand(self, node: _Node, heap):
        cands = self.branch_candidates(node, self.strong)
        if not cands:
            # every neuron fixed, the LP value is the node's exact minimum but no witness
            # with margin κ was found in it: keep its bound in the final lower bound
            self.closed_min = min(self.closed_min, node.lb)
            return
        best, best_key = None, None
        for k, j in cands:
            children = []
            for sgn in (1, -1):
                splits = [s.copy() for s in node.splits]
                splits[k][j] = sgn
                bounds = self.child_bounds(node, splits, k)
                children.append(
                    self.evaluate(node.target, bounds, splits, node.lb, node.depth + 1, node.basis)
                )
            lbs = sorted(math.inf if c is None else c.lb for c in children)
            key = (lbs[0], lbs[1])
            if best_key is None or key > best_key:
                best, best_key = children, key
            if len(cands) == 1 or self.remaining() <= 0 or lbs[0] >= self.best:
                break
        for child in best:
            if child is not None and child.lb < self.best:
                heapq.heappush(heap, child)

    def evaluate(self, target, bounds, splits, parent_lb, depth, basis=None):
        """Solve a node's LP; returns the node to keep open, or None if closed."""
        for k, (lo, hi) in enumerate(bounds):
            lo_e, hi_e = effective(lo, hi, splits[k])
            if np.any(lo_e > hi_e):
                return None  # empty sub-domain (sound bounds)
        st, lb, x, lp = self._solve(target, bounds, splits, basis=basis)
        if st == "infeasible":
            return None
        if st != "optimal":
            return _Node(parent_lb, next(self.seq), target, splits, bounds, None, depth, basis)
        own_basis = lp.h.getBasis() if self.warm else None
        lb = max(lb, parent_lb)
        g = lp.flow(x)
        self.consider(self.prob.delta_mu + g, target, "lp")
        if lb >= self.best:
            return None
        hint = self._hint(lp, x)
        # exact LP solution (every ReLU satisfied)? Then lb is the node's exact value.
        tight = True
        for z, a, _ in hint:
            if np.any(np.abs(a - np.maximum(z, 0.0)) > 1e-9 * (1 + np.abs(z))):
                tight = False
                break
        node = _Node(lb, next(self.seq), target, splits, bounds, hint, depth, own_basis)
        if tight:
            self.region_search(target, self.prob.delta_mu + g, bounds)
            if self.best <= lb + self.rtol * self.best:
                self.closed_min = min(self.closed_min, lb)
                return None
        return node

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
        self.domain, use_image = problem_domain(self.prob, radius)
        self.v_img = self.domain.v_img if use_image else None
        self.resid = self.domain.resid if use_image else None

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

    def finish(self, heap, lower_hint, proven=0.0) -> BabOutcome:
        lower = max(self.lower(heap), min(proven, self.best))
        if lower_hint > lower and lower_hint <= self.best:
            lower = lower_hint  # a proven bound from the caller
        stats = {"lp_solves": self.lp_solves, "open": len(heap), "radius": self.radius}
        if self.best_delta is None:
            if not heap and not math.isfinite(self.closed_min) and self.radius >= self.cap:
                return BabOutcome(
                    "infeasible",
                    math.inf,
                    math.inf,
                    None,
                    None,
                    self.nodes,
                    "no adversarial within the search radius",
                    stats,
                )
            return BabOutcome(
                "timeout", lower, math.inf, None, None, self.nodes, "no adversarial found", stats
            )
        gap_ok = self.best - lower <= self.rtol * self.best + 1e-12
        status = "optimal" if gap_ok else "timeout"
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


def linearised_attack(solver: _Solver, budget: float, iters: int = 12) -> None:
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


def branch_and_bound(
    prob: Problem,
    *,
    radius: float,
    deadline: float,
    rtol: float = 1e-6,
    kappa: float = 1e-9,
    incumbent: np.ndarray | None = None,
    lower_hint: float = 0.0,
    bound_fn=None,
    chain=None,
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
        bound_fn=bound_fn,
        chain=chain,
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
