"""Nodes of the per-node-LP branch and bound (:mod:`._bab`): a node (target, ReLU splits,
intermediate bounds, the LP's hint and basis), its evaluation by the safe dual bound of
its LP relaxation (:mod:`._relaxlp`), the choice of the neuron to split (the relaxation
gap weighted by the triangle row's dual), the children's bounds, and the local search
over linear regions from an LP solution."""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from flowverify.verification.chain_bounds import effective, relu_bounds

logger = logging.getLogger(__name__)


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


class _Branching:
    """Node operations of :class:`~._bab._Solver` (a mixin: the solver holds the state)."""

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
        return relu_bounds(
            self.prob, min(self.radius, self.best), splits=splits, known=parent.bounds
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
