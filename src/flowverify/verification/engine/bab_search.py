"""The search of branch and bound on ReLU splits (:mod:`.bab`): a fixed-ε decision and the
exact radius, on one search tree kept across radii.

A subdomain of a partition of the search space at one ``ε`` is a subdomain at any
other, so every decision of a :class:`~.bab.SplitBab` works on the same tree.  Each
subdomain keeps, per margin, the largest ``ε`` at which it (or an ancestor) was proven
(:attr:`~.subdomain._Sub.mrad`), its children once split and the smallest ``ε`` at which
its own bound failed.  A decision at ``ε`` walks the tree from the root: a subdomain
proven at ``ε`` or above is done; one that already failed at ``ε`` or below is replaced by
its children without being bounded again; the others are bounded at ``ε`` (warm-started
with their slopes ``α`` and multipliers ``β``) and split where still open, into the
children they had if any.  So neither a proof nor a decision that ran out of time is
lost: the radius search climbs from the proven side, and when a decision at ``ε`` runs
out of its share of the time, the next one at a smaller ``ε`` finds the subdomains that
were closed at ``ε`` done and resumes the rest (before, each decision started again from
the leaves of the last proof, and the work of a decision that ran out of time was
discarded: about two thirds of the nodes bounded on fc digits 1 and 5 at 60 s).

Each bounded subdomain also gets a proven radius per margin (:meth:`~.bab.SplitBab.
_proven`): the largest ``ε' <= ε`` at which its bound's relaxation, valid on ``D_ε`` and
so on every smaller region, keeps the margin positive (0 for a subdomain whose bound is
negative at the image itself, e.g. one the image is not in); its children inherit it.
The smallest over the open subdomains is a radius proven on the whole search space, so a
decision that runs out of time still raises the proven radius, and subdomains are taken
smallest proven radius first (then lowest bound).
"""

from __future__ import annotations

import heapq
import math
import time

import numpy as np
import torch

from flowverify.core.memory import release_free_memory
from flowverify.verification.engine.branching import fsb_choices
from flowverify.verification.engine.region import polish, region_lp
from flowverify.verification.engine.subdomain import BabDecision, BabRadius, _Sub

__all__ = ["BabSearch"]

_STUCK = "a fully split subdomain still has a negative bound (its multipliers did not converge)"


class BabSearch:
    """Decisions and the radius search of :class:`~.bab.SplitBab` (a mix-in: it bounds,
    falsifies and scores through the methods of that class)."""

    _tree: _Sub | None = None

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
                    None,  # its open margins: set where it is bounded
                    sub.bound,
                    sub.depth + 1,
                    bounds=None if sub.bounds is None else dict(sub.bounds),
                    eps=sub.eps,
                    stale=self._stale(sub.stale, best_i),
                    theta=sub.theta,
                    mrad=sub.mrad.clone(),
                    radius=sub.radius,
                )
            )
        # the children hold what they start from; an interior subdomain bounded again
        # (at a smaller ε) starts afresh
        sub.alpha = sub.beta = sub.bounds = None
        sub.theta = {}
        return kids

    def _fresh(self) -> _Sub:
        dev = self.prob.device
        splits = {
            i: torch.zeros(self.graph.nodes[i].size, dtype=torch.int8, device=dev)
            for i in self.relus
        }
        return _Sub(
            splits,
            open=torch.ones(self.m, dtype=torch.bool, device=dev),
            mrad=torch.zeros(self.m, dtype=torch.float64, device=dev),
        )

    @staticmethod
    def _visit(sub: _Sub, eps: float) -> list[_Sub] | None:
        """Where the walk of the tree at ``ε`` goes from ``sub``: ``[]`` if it is proven
        at ``ε`` or above, its children (with its proven radii) if its own bound failed
        at ``ε`` or below, else None (``sub`` is to be bounded at ``ε``)."""
        if sub.radius >= eps:
            return []
        if not (sub.kids and sub.failed <= eps):
            return None
        for kid in sub.kids:
            kid.mrad = torch.maximum(kid.mrad, sub.mrad)
            kid.radius = float(kid.mrad.min())
        return sub.kids

    def _frontier(self, eps: float) -> list[_Sub]:
        """The subdomains of the tree to bound at ``ε``: down from the root by
        :meth:`_visit`."""
        if self._tree is None:
            self._tree = self._fresh()
        out, stack = [], [self._tree]
        while stack:
            sub = stack.pop()
            kids = self._visit(sub, eps)
            if kids is None:
                out.append(sub)
            else:
                stack.extend(reversed(kids))
        return out

    def decide(
        self,
        eps: float,
        *,
        deadline: float | None = None,
        fresh: bool = False,
        frontier: list[_Sub] | None = None,
    ) -> BabDecision:
        """Whether every image of ``D_ε`` (raw ``ε``) is classified ``label``, on the
        search tree of the earlier decisions of this object (a new one the first time or
        with ``fresh``), starting from its ``frontier`` at ``ε`` (:meth:`_frontier`, if
        the caller has it)."""
        if fresh:
            self._tree, frontier = None, None
        root = self._root(eps)
        heap: list = []
        todo, first = frontier if frontier is not None else self._frontier(eps), True

        def push(sub):
            heapq.heappush(heap, (sub.radius, sub.bound, next(self._tick), sub))

        while todo:
            for c0 in range(0, len(todo), self.batch):
                if c0 and deadline is not None and time.perf_counter() >= deadline:
                    return self._late(todo[c0:] + [h[-1] for h in heap])
                chunk = todo[c0 : c0 + self.batch]
                for sub in chunk:
                    sub.open = sub.mrad < eps
                iters = 2 * self.iterations if first else self.iterations
                lb, scores, q = self._bound(chunk, eps, root, iters)
                self.nodes += len(chunk)
                release_free_memory()  # the batch's temporaries (see core.memory)
                wit = self._falsify(chunk, lb, q, eps)
                if wit is not None:
                    return BabDecision("falsified", self.nodes, witness=wit)
                keep = [k for k, sub in enumerate(chunk) if bool(sub.open.any()) and not sub.kids]
                choice = fsb_choices(self, self._last, scores, self.candidates, keep)
                affine = []  # every unstable neuron split: the network is affine there
                for k, sub in enumerate(chunk):
                    if not bool(sub.open.any()):
                        continue
                    sub.failed = min(sub.failed, eps)
                    sub.kids = sub.kids or self._branch(sub, choice[k])
                    if sub.kids is None:
                        affine.append(sub)
                    for kid in self._visit(sub, eps) or ():  # its children, now failed
                        push(kid)
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
                        rest = [s for s in affine if bool(s.open.any())]  # sub included
                        rest += todo[c0 + self.batch :] + [h[-1] for h in heap]
                        return self._late(rest, None if late else _STUCK, sub.bound)
            first = False
            todo = []
            while heap and len(todo) < max(self.batch // 2, 1):
                sub = heapq.heappop(heap)[-1]
                kids = self._visit(sub, eps)
                if kids is None:
                    todo.append(sub)
                for kid in kids or ():
                    push(kid)
            if todo and deadline is not None and time.perf_counter() >= deadline:
                rest = todo + [h[-1] for h in heap]
                return self._late(rest, worst=min(s.bound for s in rest))
        return BabDecision("certified", self.nodes)

    def _late(self, rest: list, why: str | None = None, worst: float = -math.inf):
        """``unknown``, with the smallest proven radius of the subdomains ``rest`` left
        open (the others are closed at ``ε``, above it): a radius proven everywhere."""
        proven = min((sub.radius for sub in rest), default=0.0)
        why = why or "time limit reached"
        return BabDecision("unknown", self.nodes, message=why, worst=worst, proven=proven)

    def radius(
        self,
        lower: float,
        upper: float,
        witness: np.ndarray | None = None,
        *,
        deadline: float | None = None,
        rtol: float = 1e-3,
        target: float | None = None,
    ) -> BabRadius:
        """The exact radius (raw units) between a proven ``lower`` and the W1 ``upper`` of
        a known adversarial ``witness``.

        Decisions climb from the proven side, ``ε = lower (1 + step)``, on one search
        tree: the step doubles after a proof and shrinks (to ``rtol`` at least) after a
        decision that ran out of its share of the time (a quarter of what is left, or 1.5
        times what bounding the subdomains it starts from takes at the search's rate so
        far, if longer); the next decision resumes its tree.  A witness found on the way
        lowers ``upper``.

        With ``target``, a fixed-ε decision by the same climb: no decision above
        ``target``, and the search stops once ``lower >= target`` (certified) or
        ``upper <= target`` (a witness within it)."""
        from flowverify.transport.flows import w1_distance

        t0, n0 = time.perf_counter(), self.nodes
        lo, hi = float(lower), float(upper)
        step, message, ceiling = 0.1, "", math.inf
        self._tree = None  # one tree per search
        while hi > lo * (1 + rtol):
            if target is not None and (lo >= target or hi <= target):
                break  # decided
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                message = "time limit reached"
                break
            eps = lo * (1 + step) if lo > 0 else hi / 8
            if eps >= ceiling:  # halfway to where the last ran out, or there once close
                eps = ceiling if ceiling <= lo * 1.02 else (lo + ceiling) / 2
            eps = min(eps, hi / (1 + rtol / 4), math.inf if target is None else target)
            start, share = self._frontier(eps), None
            if deadline is not None:  # a quarter of what is left, or time to bound the start
                rate = (self.nodes - n0) / max(now - t0, 1e-9) if self.nodes > n0 else math.inf
                need = 1.5 * len(start) / rate
                share = now + min(max((deadline - now) / 4, need, 0.05), deadline - now)
            dec = self.decide(eps, deadline=share, frontier=start)
            if dec.status == "certified":
                lo, step = eps, step * 2 if math.isinf(ceiling) else step
                ceiling = math.inf if eps >= ceiling else ceiling
            elif dec.status == "falsified":  # polished on its linear region first
                better = polish(self, dec.witness, deadline=share, check=self.check)
                wit, w1 = better or (dec.witness, w1_distance(dec.witness, self.x[0], unit="raw"))
                w1 = float(w1)
                if w1 < hi:
                    hi, witness = w1, wit
                step = min(step, max(hi / max(lo, 1e-300) - 1, 0) / 2)
            else:  # its open subdomains' proven radii still prove their smallest
                lo, ceiling = max(lo, min(dec.proven, eps)), min(ceiling, eps)
                step = max(step / 4, rtol)
        exact = hi <= lo * (1 + rtol)
        return BabRadius(lo, hi, witness, exact, self.nodes, time.perf_counter() - t0, message)
