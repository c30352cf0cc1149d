r"""Complete verification on the engine: branch and bound on ReLU splits (beta-CROWN).

A *subdomain* fixes the phase of some (leaky) ReLU neurons, ``s_j z_j >= 0`` with
``s_j = ±1``.  Its lower bound on each margin ``f_y - f_t`` over the input domain
``D_ε`` (the W1 polytope of Theorem 6, or the ball of Theorem 3) is a CROWN bound
(:func:`~.crown.backward`) with

* the pre-activation bounds of the root (:meth:`~.crown.EngineProblem.layer_bounds` at
  ``ε``, those above an unstable ReLU with slopes optimised per bound row,
  :mod:`.intermediate`), clamped by the splits: a split neuron is linear on its side,
  and a split that contradicts the root bounds leaves an empty subdomain (closed);
* lower slopes ``α`` of the unsplit unstable neurons (alpha-CROWN) and Lagrange
  multipliers ``β >= 0`` of the split constraints, which add ``-β_j s_j`` to the
  coefficients of the split neurons' inputs: for every ``β >= 0``,
  ``min_ν f(ν) - Σ_j β_j s_j z_j(ν)`` is at most the minimum of ``f`` over the subdomain
  (Wang et al. 2021, beta-CROWN);
* ``α`` and ``β`` optimised by Adam for the bound, projected on ``[a, 1]`` and
  ``[0, ∞)``, warm-started from the parent, for a batch of subdomains at once.  Every
  iterate is a sound bound; the best is kept.  The polytope enters through its
  Kantorovich dual (:func:`~..polytope.polytope_gain_rows`), whose gradient in ``q`` is
  ``µ - ν*`` with ``ν*`` the image of the optimal transport plan
  (:func:`~..polytope.polytope_plan`).

Branching (:mod:`.branching`): BaBSR-like scores, or filtered smart branching over the
top candidates of each subdomain (both children of each bounded in one batch).  A
subdomain with every unstable neuron split (the network affine on it) gets a longer
optimisation of its multipliers, then an LP (:mod:`.region`).  Falsification: the
minimiser ``ν*`` of the worst open margin's bound (a point of ``D_ε``) is run through the
float64 model; a misclassified ``ν*`` is a witness.

:class:`SplitBab` decides one image at one ``ε`` (:meth:`~SplitBab.decide`, like a
VNN-COMP verifier) and searches the exact radius (:meth:`~SplitBab.radius`) with one
search tree across radii (:mod:`.bab_search`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch

from flowverify.verification import numerics as _numerics
from flowverify.verification import polytope as _polytope
from flowverify.verification.engine import activations as act
from flowverify.verification.engine import subdomain as _subdomain
from flowverify.verification.engine.bab_search import BabSearch
from flowverify.verification.engine.branching import babsr_scores
from flowverify.verification.engine.crown import EngineProblem
from flowverify.verification.engine.domains import make_domain
from flowverify.verification.engine.graph import Graph
from flowverify.verification.engine.intermediate import optimise_bounds
from flowverify.verification.engine.subdomain import BabDecision, BabRadius, _Sub

__all__ = ["BabDecision", "BabRadius", "SplitBab"]

#: Most search steps on the dual variable for the transport plans that serve as gradients.
PLAN_ITERS = 12

#: Tolerance of the polytope dual's search for a subdomain's intermediate bounds,
#: relative to the ball bound's scale (:data:`~..polytope.THETA_TOL` for the margins):
#: every value is sound, and 1e-2 of the ball bound saves half the dual
#: evaluations on the bundled ``fc``.
REFINE_TOL = 1e-2


class SplitBab(BabSearch):
    """Branch and bound for one image over the W1 polytope (or ball) of the engine.

    Parameters
    ----------
    graph : Graph
        The model (float64).
    x : ndarray
        ``(C, H, W)`` the image, data units.
    label : int
    feasible : bool
        The W1 polytope (Theorem 6) if true, else the ball (Theorem 3).
    inv_scale : ndarray or None
        ``(C,)``: the model reads ``ν / s`` per channel.
    batch : int
        Subdomains bounded together.
    iterations : int
        Adam steps on ``α``, ``β`` per batch (the root gets twice as many).
    refine : bool
        Recompute a subdomain's intermediate bounds through its splits (see
        :meth:`relaxations`); otherwise the root's, clamped by the splits.
    candidates : int
        Filtered smart branching over this many BaBSR candidates per subdomain
        (:mod:`.branching`); 1 (default): BaBSR alone.
    root_iterations : int
        Adam steps per layer on the slopes of the root's intermediate bounds
        (:mod:`.intermediate`); 0: CROWN's slopes.
    """

    def __init__(
        self,
        graph: Graph,
        x: np.ndarray,
        label: int,
        *,
        feasible: bool = True,
        inv_scale=None,
        device="cpu",
        batch: int = 64,
        iterations: int = 8,
        lr: float = 0.1,
        refine: bool = True,
        candidates: int = 1,
        root_iterations: int = 20,
    ):
        self.graph = graph
        self.x = np.asarray(x, dtype=np.float64)[None]
        self.label = int(label)
        self.feasible = feasible
        inv = None if inv_scale is None else np.asarray(inv_scale, np.float64).reshape(1, -1)
        self.prob = EngineProblem(
            graph,
            self.x,
            np.array([label]),
            make_domain("w1-polytope" if feasible else "w1-ball", self.x),
            inv_scale=inv,
            device=device,
        )
        self.mu = self.prob.domain.mu[0]
        self.batch, self.iterations, self.lr = int(batch), int(iterations), float(lr)
        self.refine, self.candidates = bool(refine), int(candidates)
        self.root_iterations = int(root_iterations)
        #: ``{node: {relu: (2, n, n_relu)}}``: the root's optimised slopes per bound row
        #: (:func:`~.intermediate.optimise_bounds`), reused by :meth:`_refine`.
        self.row_alpha: dict = {}
        self.relus = [
            i for i in graph.activations() if isinstance(graph.nodes[i].op, act.LeakyReLUOp)
        ]
        self.m = self.prob.spec.shape[1]
        self.nodes = 0
        #: ``image -> misclassified`` for polished witnesses (:func:`.region.polish`;
        #: ``None``: the float64 graph's logits), e.g. the caller's own model.
        self.check = None
        self._tick = itertools.count()

    # ------------------------------------------------------------------ bounding

    def _root(self, eps: float):
        """The root's bounds and relaxations at raw ``ε``, intermediate bounds optimised
        (:func:`~.intermediate.optimise_bounds`)."""
        eps_t = torch.full((1,), float(eps), dtype=torch.float64, device=self.prob.device)
        root = self.prob.layer_bounds(np.zeros(1, dtype=np.int64), eps_t)
        if self.root_iterations > 0:
            root = optimise_bounds(self, eps, root, iterations=self.root_iterations)
        return root

    def _gain(self, q: torch.Tensor, eps: float, rows: torch.Tensor, *, bound=True, slopes=True):
        """Sound gains ``(D, m)`` of the rows ``q (D, m, C, H, W)`` where ``rows`` (``inf``
        elsewhere; ``None`` unless ``bound``) and, over the polytope with ``slopes``, the
        gradient ``µ - ν*`` of each gain in ``q`` (``ν*`` the optimal plan's image; a
        gradient only, no soundness rests on it, so a coarser search for the kink)."""
        d, m = q.shape[:2]
        out = slope = None
        if bound:  # the domain's own (sound) gain, on one image
            eps_t = torch.full((d,), float(eps), dtype=q.dtype, device=q.device)
            gain = self.prob.domain.gain(q, eps_t, np.zeros(d, dtype=np.int64), rows=rows)
            out = torch.where(rows, gain, math.inf)
        if not self.feasible:
            return out, None
        kk, rr = torch.nonzero(rows, as_tuple=True)
        sel = np.ascontiguousarray(q[kk, rr].reshape(kk.numel(), q[0, 0].numel()).cpu().numpy())
        e = np.full(sel.shape[0], float(eps))
        if slopes:
            slope = torch.zeros((d, m, q[0, 0].numel()), dtype=q.dtype, device=q.device)
            if kk.numel():
                nu = _polytope.polytope_plan(sel, self.mu, e, iters=PLAN_ITERS)
                slope[kk, rr] = torch.as_tensor(
                    self.mu.reshape(1, -1) - nu.reshape(sel.shape[0], -1),
                    dtype=q.dtype,
                    device=q.device,
                )
        return out, slope

    def _front_slope(self, lin, fresh: torch.Tensor) -> torch.Tensor:
        """The gains' gradients ``µ - ν*`` (:meth:`_gain`, ``(D, m, C*H*W)``) on the
        front's rows: ``<q, µ - ν*> = <Λ, G (µ - ν*) / s>``."""
        inv = lin.inv_scale[:, None, :, None].detach()
        d, m = fresh.shape[:2]
        slope = (fresh.reshape(d, m, inv.shape[2], -1) * inv).flatten(2)
        return slope @ self.prob._front_net.G.T

    def relaxations(self, subs: list[_Sub], root, eps: float):
        """The relaxation of every activation on each subdomain ``{i: relax}`` (for a ReLU
        flat, ``(D, n)``), per ReLU ``(lo, up) (D, n)``, its unstable neurons, split signs
        ``(D, n)``, and which subdomains are empty ``(D,)``.

        A ReLU's pre-activation bounds are the root's, intersected with the subdomain's
        own (inherited from its parent) and, where a split above it is newer than them,
        recomputed by CROWN through the split-clamped relaxations above (beta-CROWN's
        intermediate bounds, without their multipliers): sound on the subdomain, where a
        split neuron is linear on its side.  The result is clamped by the ReLU's own
        splits; a subdomain whose bounds cross is empty."""
        bounds, relax = root
        d = len(subs)
        rel, lohi, unstable, signs = {}, {}, {}, {}
        empty = torch.zeros(d, dtype=torch.bool, device=self.prob.device)
        for sub in subs:
            if sub.bounds is None or sub.eps != eps:  # new, or of another ε
                sub.bounds, sub.eps, sub.stale = {}, eps, 0
                for j in self.relus:
                    if bool(sub.splits[j].any()):
                        sub.stale = self._stale(sub.stale, j)
        for i, r in relax.items():
            node = self.graph.nodes[i]
            if i not in self.relus:
                rel[i] = tuple(None if t is None else t.expand(d, *t.shape[1:]) for t in r)
                continue
            lo, up = (t.reshape(1, -1).expand(d, -1) for t in bounds[node.inputs[0]])
            own = [sub.bounds.get(i) for sub in subs]
            if any(o is not None for o in own):
                lo = torch.stack([lo[0] if o is None else o[0] for o in own])
                up = torch.stack([up[0] if o is None else o[1] for o in own])
            todo = [k for k, sub in enumerate(subs) if 0 < sub.stale <= i]
            if todo and self.refine and node.inputs[0] not in self.prob.front:
                lo, up = self._refine(i, todo, lo, up, rel, eps, [subs[k] for k in todo])
                for k in todo:  # copies: a view would keep the whole batch's alive
                    subs[k].bounds[i] = (lo[k].clone(), up[k].clone())
            s = torch.stack([sub.splits[i] for sub in subs]).to(lo.dtype)
            lo = torch.where(s > 0, lo.clamp(min=0.0), lo)
            up = torch.where(s < 0, up.clamp(max=0.0), up)
            empty |= (lo > up).any(dim=1)
            up = torch.maximum(up, lo)
            lohi[i], signs[i] = (lo, up), s
            unstable[i] = (lo < 0) & (up > 0)
            rel[i] = node.op.relax(lo, up)  # (s_lo, None, s_up, b_up), each (D, n)
        for sub in subs:
            sub.stale = 0
        return rel, lohi, unstable, signs, empty

    def _stale(self, stale: int, split_at: int) -> int:
        """The first ReLU whose bounds a new split at ReLU ``split_at`` makes stale (0:
        none), combined with ``stale``."""
        later = [j for j in self.relus if j > split_at][:1]
        return min([j for j in (stale, *later) if j > 0], default=0)

    def _refine(self, i: int, todo: list, lo, up, rel: dict, eps: float, subs: list):
        """CROWN bounds of ReLU ``i``'s input on the subdomains ``todo`` (``subs``) through
        the relaxations ``rel`` of the activations above (lower slopes per row: the root's
        optimised ones, :attr:`row_alpha`), intersected with ``lo``, ``up``; each row's
        polytope dual starts from its bracket in the parent."""
        prob, at = self.prob, self.graph.nodes[i].inputs[0]
        rows = torch.as_tensor(todo, device=lo.device)
        sub_rel = {j: tuple(None if t is None else t[rows] for t in r) for j, r in rel.items()}
        k, shape = len(todo), (len(todo), *self.graph.nodes[at].shape)
        eps_t = torch.full((k,), float(eps), dtype=torch.float64, device=lo.device)
        with torch.no_grad():
            lo2, up2 = prob._crown_bounds(
                np.zeros(k, dtype=np.int64),
                eps_t,
                at,
                lo[rows].reshape(shape),
                up[rows].reshape(shape),
                sub_rel,
                store := _subdomain.theta_store(subs, i, lo.shape[1]),
                REFINE_TOL,
                self.row_alpha.get(at),
            )
        _subdomain.keep_theta(subs, i, store)
        lo, up = lo.clone(), up.clone()
        lo[rows] = torch.maximum(lo[rows], lo2.reshape(k, -1))
        up[rows] = torch.minimum(up[rows], up2.reshape(k, -1))
        return lo, up

    def _bound(self, subs: list[_Sub], eps: float, root, iterations: int):
        """Bound the subdomains ``subs`` at ``ε``; updates their ``α``, ``β``, ``open`` and
        ``bound``.  Returns ``(lb (D, m), scores {relu: (D, n)}, q (D, m, C, H, W))``.

        The sound bound (the polytope's dual gain) is evaluated at the warm start, at the
        last iterate and every ``refresh`` steps; in between, Adam follows the bound with
        the gain linearised at the last plan (its gradient, by the envelope theorem)."""
        graph, prob, m = self.graph, self.prob, self.m
        d = len(subs)
        idx = np.zeros(d, dtype=np.int64)
        rel, lohi, unstable, signs, empty = self.relaxations(subs, root, eps)
        params = {}
        for i in self.relus:
            lo, up = lohi[i]
            n = lo.shape[1]
            a0 = (up >= -lo).to(lo.dtype)[:, None, :].expand(d, m, n).clone()
            b0 = torch.zeros((d, m, n), dtype=lo.dtype, device=lo.device)
            for k, sub in enumerate(subs):
                if sub.alpha is not None:
                    a0[k] = sub.alpha[i]
                    _subdomain.unpack(sub.beta[i], b0[k])
            params[("a", i)], params[("b", i)] = a0, b0
        open_rows = torch.stack([sub.open for sub in subs]).to(prob.device) & ~empty[:, None]
        best = torch.full((d, m), -math.inf, dtype=torch.float64, device=prob.device)
        keep = {key: v.clone() for key, v in params.items()}
        spec = prob.spec[:1].expand(d, *prob.spec.shape[1:])
        moments = {key: (torch.zeros_like(v), torch.zeros_like(v)) for key, v in params.items()}
        refresh = 4
        slope = scores = q_best = None
        for it in range(iterations + 1):
            final = it == iterations
            evaluate, replan = it == 0 or final, it % refresh == 0 and not final
            for v in params.values():
                v.requires_grad_(not final)
            rels, extra, record = dict(rel), {}, {}
            for i in self.relus:
                op, shape = graph.nodes[i].op, graph.nodes[i].shape
                s_lo, _, s_up, b_up = rel[i]
                alpha = params[("a", i)].clamp(op.a, 1.0)
                slope_lo = torch.where(unstable[i][:, None], alpha, s_lo[:, None])
                rels[i] = (
                    slope_lo.reshape(d, m, *shape),
                    None,
                    s_up.reshape(d, *shape),
                    b_up.reshape(d, *shape),
                )
                beta = params[("b", i)].clamp(min=0.0)
                extra[i] = (-beta * signs[i][:, None]).reshape(d, m, *shape)
            lin = prob.linear(idx, graph.output, spec, rels, extra=extra, record=record)
            if evaluate or replan or not self.feasible:
                q = prob.q(lin)
            if evaluate or replan:
                with torch.no_grad():
                    gain, fresh = self._gain(
                        q.detach(), eps, open_rows, bound=evaluate, slopes=replan
                    )
                if replan and self.feasible:  # <q, µ - ν*> = <Λ, G (µ - ν*) / s>
                    slope = self._front_slope(lin, fresh)
            if evaluate:
                with torch.no_grad():
                    val = lin.centre - gain - _numerics.margin_tolerance(lin.centre, gain)
                better = (val > best) & open_rows
                if bool(better.any()):
                    best = torch.where(better, val, best)
                    rows = better.any(dim=1)
                    for key, v in params.items():
                        keep[key][rows] = v.detach()[rows]
                if final:
                    still = open_rows & (val <= 0)
                    scores = babsr_scores(self.relus, record, rel, lohi, unstable, signs, still)
                    self._last = (rels, extra, slope, still, eps)
                    q_best = q.detach()
                    self._proven(subs, lin, still, eps)
                    break
            if not params:  # nothing to optimise (no ReLU)
                continue
            if self.feasible:  # the gain linearised at the last plan
                surrogate = lin.centre - (lin.lam * slope).sum(dim=2)
            else:
                surrogate = lin.centre - self.prob.domain.norm(q) * eps
            loss = -torch.where(open_rows, surrogate, torch.zeros_like(surrogate)).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for (key, v), g in zip(params.items(), grads, strict=True):
                    g = torch.where(g.abs() < 1e-30, torch.zeros_like(g), g)  # no subnormals
                    m1, m2 = moments[key]
                    m1.mul_(0.9).add_(g, alpha=0.1)
                    m2.mul_(0.999).add_(g * g, alpha=0.001)
                    step = m1 / (1 - 0.9 ** (it + 1))
                    den = (m2 / (1 - 0.999 ** (it + 1))).sqrt_().add_(1e-8)
                    v.sub_(self.lr * step / den)
        best = torch.where(empty[:, None], math.inf, best)
        # warm starts only, float32 copies (no views of the batch's tensors): α on every
        # neuron (a neuron stable here may be unstable where the subdomain or its children
        # are bounded at a larger ε: its last slope starts it there, which decided 256x2
        # digits the default slope left open), β on the split neurons only
        for k, sub in enumerate(subs):
            sub.alpha = {i: keep[("a", i)][k].to(torch.float32) for i in self.relus}
            sub.beta = {i: _subdomain.pack(keep[("b", i)][k], signs[i][k] != 0) for i in self.relus}
            sub.open = sub.open & (best[k] <= 0)
            sub.mrad = torch.where(sub.open, sub.mrad, sub.mrad.clamp(min=float(eps)))
            sub.radius = float(sub.mrad.min())
            sub.bound = float(best[k][sub.open].min()) if bool(sub.open.any()) else math.inf
        return best, scores, q_best

    def _proven(self, subs: list[_Sub], lin, still, eps: float) -> None:
        """Raise each subdomain's proven radius of each margin ``still`` open at ``ε``
        (:attr:`_Sub.mrad`; the others are positive at ``ε``) to the largest ``ε' <= ε``
        at which its bound's relaxation (valid on ``D_ε``, so on every smaller region)
        keeps it positive: the radius form of the same dual (:meth:`~.crown.
        EngineProblem._radii`, its rounding margin included)."""
        if not bool(still.any()):
            return
        with torch.no_grad():
            lin = dataclasses.replace(
                lin, lam=lin.lam.detach(), centre=torch.where(still, lin.centre.detach(), -1.0)
            )
            eps_t = torch.full((len(subs),), float(eps), dtype=torch.float64, device=still.device)
            rad = self.prob._radii(lin, eps_t, np.zeros(len(subs), dtype=np.int64))
            rad = torch.where(still, rad.clamp(max=float(eps)), 0.0)
        for k, sub in enumerate(subs):
            sub.mrad = torch.maximum(sub.mrad, rad[k])

    # ---------------------------------------------------------------- falsification

    def _falsify(self, subs, lb, q, eps) -> np.ndarray | None:
        """Run the minimiser of each subdomain's worst open bound through the model."""
        if not self.feasible:
            return None
        rows = [(k, int(torch.argmin(lb[k]))) for k, s in enumerate(subs) if s.bound <= 0]
        if not rows:
            return None
        qs = np.stack([q[k, r].reshape(-1).cpu().numpy() for k, r in rows])
        nu = _polytope.polytope_plan(
            qs, self.mu, float(eps) * (1 - 1e-9)
        )  # inside D_ε after rounding
        logits = self.logits(nu)
        bad = np.flatnonzero(logits.argmax(axis=1) != self.label)
        return nu[bad[0]] if bad.size else None

    def logits(self, images: np.ndarray) -> np.ndarray:
        prob = self.prob
        t = torch.as_tensor(images, dtype=torch.float64, device=prob.device)
        u = t * prob.inv_scale[:1][:, :, None, None]
        u = u.reshape(u.shape[0], *self.graph.nodes[0].shape)
        with torch.no_grad():
            return self.graph.values(u)[self.graph.output].reshape(len(images), -1).cpu().numpy()
