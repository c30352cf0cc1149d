"""The search of branch and bound on ReLU splits (:mod:`.bab`): a fixed-ε decision and the
exact radius, on one partition of the search space kept across radii.

A subdomain of a partition of the search space at one ``ε`` is a subdomain at any
other, so the radius search climbs from the proven side and starts each decision from
the leaves of the last proof (their splits, slopes ``α`` and multipliers ``β`` kept as a
warm start) instead of from the root.  A decision that runs out of its share of the time
is discarded (measured: starting the next, smaller ``ε`` from its finer partition
bounded more nodes and proved less on fc digits 0, 1, 5; the fine leaves are bounded
again at every later ``ε``).
"""

from __future__ import annotations

import heapq
import time

import numpy as np
import torch

from flowverify.verification.engine.branching import fsb_choices
from flowverify.verification.engine.region import region_lp
from flowverify.verification.engine.subdomain import BabDecision, BabRadius, _Sub

__all__ = ["BabSearch"]

_STUCK = "a fully split subdomain still has a negative bound (its multipliers did not converge)"


class BabSearch:
    """Decisions and the radius search of :class:`~.bab.SplitBab` (a mix-in: it bounds,
    falsifies and scores through the methods of that class)."""

    def _branch(self, sub: _Sub, choice) -> list[_Sub] | None:
        if choice is None:
            return None
        best_i, best_j = choice
        kids = []
        for sign in (1, -1):
            splits = {i: t.clone() for i, t in sub.splits.items()}
            splits[best_i][best_j] = sign
            kids.append(
                _Sub(
                    splits,
                    sub.alpha,
                    sub.beta,
                    sub.open.clone(),
                    sub.bound,
                    sub.depth + 1,
                    bounds=None if sub.bounds is None else dict(sub.bounds),
                    eps=sub.eps,
                    stale=self._stale(sub.stale, best_i),
                    theta=sub.theta,
                )
            )
        return kids

    def _fresh(self) -> _Sub:
        splits = {
            i: torch.zeros(self.graph.nodes[i].size, dtype=torch.int8, device=self.prob.device)
            for i in self.relus
        }
        return _Sub(splits, open=torch.ones(self.m, dtype=torch.bool, device=self.prob.device))

    def decide(self, eps: float, *, deadline: float | None = None, leaves=None) -> BabDecision:
        """Whether every image of ``D_ε`` (raw ``ε``) is classified ``label``."""
        root = self._root(eps)
        if leaves:
            start = [
                _Sub({i: t.clone() for i, t in sp.items()}, a, b, torch.ones_like(o), depth=dp)
                for sp, a, b, o, dp in leaves
            ]
        else:
            start = [self._fresh()]
        closed: list = []
        heap: list = []
        todo, first = start, True
        while todo:
            for c0 in range(0, len(todo), self.batch):
                if c0 and deadline is not None and time.perf_counter() >= deadline:
                    return BabDecision("unknown", self.nodes, message="time limit reached")
                chunk = todo[c0 : c0 + self.batch]
                iters = 2 * self.iterations if first else self.iterations
                lb, scores, q = self._bound(chunk, eps, root, iters)
                self.nodes += len(chunk)
                wit = self._falsify(chunk, lb, q, eps)
                if wit is not None:
                    return BabDecision("falsified", self.nodes, witness=wit)
                keep = [k for k, sub in enumerate(chunk) if bool(sub.open.any())]
                choice = fsb_choices(self, self._last, scores, self.candidates, keep)
                affine = []  # every unstable neuron split: the network is affine there
                for k, sub in enumerate(chunk):
                    kids = self._branch(sub, choice[k]) if bool(sub.open.any()) else []
                    if kids is None:
                        affine.append(sub)
                    for kid in kids or ():
                        heapq.heappush(heap, (kid.bound, next(self._tick), kid))
                if affine:  # a longer optimisation of their multipliers first, together
                    self._bound(affine, eps, root, 4 * self.iterations)
                for sub in affine:
                    if bool(sub.open.any()):  # then an LP, whose duals become β
                        wit = region_lp(self, sub, root, eps, deadline)
                        if wit is not None:
                            return BabDecision("falsified", self.nodes, witness=wit)
                        self._bound([sub], eps, root, 0)
                    if bool(sub.open.any()):
                        late = deadline is not None and time.perf_counter() >= deadline
                        why = "time limit reached" if late else _STUCK
                        return BabDecision("unknown", self.nodes, message=why, worst=sub.bound)
                closed += [
                    (s.splits, s.alpha, s.beta, s.open, s.depth)
                    for s in chunk
                    if not bool(s.open.any())
                ]
            first = False
            if not heap:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                return BabDecision(
                    "unknown", self.nodes, message="time limit reached", worst=heap[0][0]
                )
            todo = [heapq.heappop(heap)[2] for _ in range(min(self.batch // 2, len(heap)))]
        return BabDecision("certified", self.nodes, leaves=closed)

    def radius(
        self,
        lower: float,
        upper: float,
        witness: np.ndarray | None = None,
        *,
        deadline: float | None = None,
        rtol: float = 1e-3,
    ) -> BabRadius:
        """The exact radius (raw units) between a proven ``lower`` and the W1 ``upper`` of
        a known adversarial ``witness``.

        Decisions climb from the proven side, ``ε = lower (1 + step)``: the step doubles
        after a proof and shrinks after a decision that ran out of its share of the time
        (a quarter of what is left); each proof's partition is reused at the next ``ε``.
        A witness found on the way lowers ``upper``."""
        from flowverify.transport.flows import w1_distance

        t0 = time.perf_counter()
        lo, hi = float(lower), float(upper)
        step, leaves, message = 0.1, None, ""
        while hi > lo * (1 + rtol):
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                message = "time limit reached"
                break
            if step < rtol / 2:
                message = "the decisions above the proven radius did not finish in time"
                break
            eps = lo * (1 + step) if lo > 0 else hi / 8
            eps = min(eps, hi / (1 + rtol / 4))
            share = None if deadline is None else now + max((deadline - now) / 4, 0.05)
            dec = self.decide(eps, deadline=share, leaves=leaves)
            if dec.status == "certified":
                lo, leaves = eps, dec.leaves
                step *= 2
            elif dec.status == "falsified":
                w1 = float(w1_distance(dec.witness, self.x[0], unit="raw"))
                if w1 < hi:
                    hi, witness = w1, dec.witness
                step = min(step, max(hi / max(lo, 1e-300) - 1, 0) / 2)
            else:
                step /= 4
        exact = hi <= lo * (1 + rtol)
        return BabRadius(lo, hi, witness, exact, self.nodes, time.perf_counter() - t0, message)
