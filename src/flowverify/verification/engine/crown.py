r"""Backward bound propagation (CROWN) over a :class:`~.graph.Graph`, batched.

For a batch of images and a linear specification ``C`` of a node (the margins
``f_y - f_t`` at the logits, or ``±e_i`` at a pre-activation), :func:`backward` carries
``Λ = C`` from the node down to the input through every operator in its own form
(:mod:`.affine`), replacing each activation by its relaxation (:mod:`.activations`) and
summing the branches of a residual addition.  The result is a linear lower bound
``qᵀν + β`` in the image ``ν``, minimised over an input domain (:mod:`.domains`): the
W1 ball or polytope of Theorems 3 and 6, or an Lp ball.

:class:`EngineProblem` computes the pre-activation bounds of every activation in
execution order (interval arithmetic first, CROWN for the neurons it leaves unstable)
and gives the radius oracle ``F(ε)`` of :func:`~..search.search_radius`: every margin
stays positive on ``D_ε'`` for ``ε' <= min(ε, F(ε))``, since the relaxations built at
``ε`` hold on every smaller region.  Intermediate bounds are widened by
:data:`~..numerics.BOUND_RTOL` and margins must exceed
:func:`~..numerics.margin_tolerance` before they count (float64 throughout).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowverify.verification import flownet as _flownet
from flowverify.verification import numerics as _numerics
from flowverify.verification import search as _search
from flowverify.verification.engine import activations as act
from flowverify.verification.engine import alpha as _alpha
from flowverify.verification.engine import native as _native
from flowverify.verification.engine import patches as _patches
from flowverify.verification.engine.affine import ConvOp, LinearOp, Merge
from flowverify.verification.engine.domains import Domain
from flowverify.verification.engine.graph import Graph
from flowverify.verification.engine.intermediate import row_slopes
from flowverify.verification.engine.probes import ProbeBounds

__all__ = ["EngineProblem", "backward"]


def backward(
    graph: Graph,
    start: int,
    lam: torch.Tensor,
    relax: dict,
    stop=(),
    beta=None,
    *,
    extra=None,
    record=None,
) -> tuple:
    """Propagate ``Λ x_start`` down to ``Σ_j Λ_j x_j + β`` (a lower bound on the region).

    ``lam (B, m, *shape of node start)``; ``relax``: node position -> relaxation
    ``(s_lo, b_lo, s_up, b_up)`` of every activation below ``start``; ``stop``: nodes
    where the propagation ends (the linear front, whose image-space rows are known).
    ``extra``: activation position -> a term ``(B, m, *shape)`` added to the coefficients
    of its input (the split multipliers ``-β s`` of beta-CROWN); ``record``: a dict that
    receives each activation's coefficients before its relaxation.
    Returns ``({j: Λ_j (B, m, *shape of j)}, β (B, m))`` over ``j`` in ``stop`` or the
    input 0.
    """
    beta = lam.new_zeros(lam.shape[:2]) if beta is None else beta
    ends: dict[int, torch.Tensor] = {}
    if start in stop or start == 0:
        return {start: lam}, beta
    pending: dict[int, torch.Tensor] = {start: lam}

    def push(j, value):
        into = ends if (j in stop or j == 0) else pending
        into[j] = into[j] + value if j in into else value

    for i in range(start, 0, -1):
        lam_i = pending.pop(i, None)
        if lam_i is None:
            continue
        node = graph.nodes[i]
        op = node.op
        if isinstance(op, act.MaxPoolOp):
            lam_i, beta = op.apply(lam_i, beta, relax[i])
            push(node.inputs[0], lam_i)
        elif isinstance(op, act.Activation):
            if record is not None:
                record[i] = lam_i
            lam_i, beta = act.apply(lam_i, beta, relax[i])
            if extra is not None and i in extra:
                lam_i = lam_i + extra[i]
            push(node.inputs[0], lam_i)
        elif isinstance(op, Merge):
            push(node.inputs[0], lam_i)
            push(node.inputs[1], op.sign * lam_i if op.sign != 1.0 else lam_i)
        else:
            beta = beta + op.bias(lam_i)
            push(node.inputs[0], op.backward(lam_i))
    return ends, beta


class EngineProblem:
    """Verification problems of ``n`` images on one graph, over one input domain.

    Parameters
    ----------
    graph : Graph
        The model (float64, on ``device``).
    x : ndarray
        ``(n, C, H, W)`` images, data units.
    labels : ndarray
        ``(n,)`` classes to certify.
    domain : Domain
        Built on ``x``.
    inv_scale : ndarray or None
        ``(n, C)``: the model reads ``ν / s`` per channel (``input_scale="normalised"``).
    device : torch.device
    """

    def __init__(
        self,
        graph: Graph,
        x,
        labels,
        domain: Domain,
        *,
        inv_scale=None,
        device="cpu",
        optimise: bool = False,
        iterations: int = 20,
        lr: float = 0.25,
    ):
        self.graph, self.domain = graph, domain
        self.optimise, self.iterations, self.lr = optimise, iterations, lr
        self._alpha: dict[tuple[int, int], torch.Tensor] = {}
        self.device = torch.device(device)
        kw = {"dtype": torch.float64, "device": self.device}
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float64), **kw)
        n, c = self.x.shape[:2]
        inv = np.ones((n, c)) if inv_scale is None else np.asarray(inv_scale, np.float64)
        self.inv_scale = torch.as_tensor(np.broadcast_to(inv, (n, c)).copy(), **kw)
        spec = _flownet.margin_spec(labels, graph.num_classes)
        self.spec = torch.as_tensor(spec, **kw).reshape(n, spec.shape[1], *graph.nodes[-1].shape)
        self.pre = graph.pre_activations()
        self.front = graph.linear_front(self.pre)
        self._ends = sorted(self.front) + ([0] if graph.reaches_input(self.pre, self.front) else [])
        self._front_net: _flownet.FlowNet | None = None
        self._seen = ProbeBounds(graph, self.pre, self.device)

    @property
    def size(self) -> int:
        return self.x.shape[0]

    # ------------------------------------------------------------------ linear bounds

    def _model_input(self, nu: torch.Tensor, idx) -> torch.Tensor:
        u = nu * self.inv_scale[idx][:, :, None, None]
        return u.reshape(u.shape[0], *self.graph.nodes[0].shape)

    def _front(self):
        """The linear front as one map: a :class:`~..flownet.FlowNet` whose image-space rows
        ``G`` stack the rows ``Q_j`` of every front node (and the identity for the input
        when a bound can reach it directly), and the values of those rows at the images.

        The map does not depend on the images: it is built once per graph and device and
        shared by every problem (stages, batches) on that graph."""
        if self._front_net is None:
            key = ("front", tuple(self._ends), str(self.device))
            if key not in self.graph.cache:
                self.graph.cache[key] = _front_map(self.graph, self._ends, self.x[0], self.device)
            self._front_net, self._offsets = self.graph.cache[key]
            vals = self.graph.values(self._model_input(self.x, slice(None)))
            self._front_vals = torch.cat([vals[j].reshape(self.size, -1) for j in self._ends], 1)
        return self._front_net

    def linear(
        self, idx, start: int, lam: torch.Tensor, relax: dict, beta=None, **hooks
    ) -> _flownet.Linear:
        """The lower bound of ``Λ x_start + β`` as ``Λ' z_front + β'`` (a
        :class:`~..flownet.Linear` on the front's rows, centre = its value at ``µ``);
        ``hooks``: ``extra``/``record`` of :func:`backward`."""
        net = self._front()
        ends, beta = backward(self.graph, start, lam, relax, stop=self.front, beta=beta, **hooks)
        b, r = lam.shape[:2]
        if len(ends) == 1 and len(self._ends) == 1:
            lam_f = next(iter(ends.values())).reshape(b, r, -1)
        else:
            lam_f = lam.new_zeros((b, r, net.G.shape[0]))
            for j, lj in ends.items():
                lo, hi = self._offsets[j]
                lam_f[:, :, lo:hi] = lj.reshape(b, r, -1)
        # each row summed alone: the same value whatever the batch
        vals = self._front_vals[idx]
        if _native.usable(lam_f, vals):
            centre = _native.row_dot(lam_f, vals) + beta
        else:
            centre = (lam_f * vals[:, None, :]).sum(dim=2) + beta
        return _flownet.Linear(lam_f, centre, torch.zeros_like(centre), self.inv_scale[idx])

    def q(self, lin: _flownet.Linear) -> torch.Tensor:
        """Image-space coefficients ``(B, R, C, H, W)`` of a bound."""
        q = lin.q(self._front_net)
        return q.reshape(*q.shape[:2], *self.x.shape[1:])

    def norm(self, lin: _flownet.Linear, rows=None, *, float32: bool = False) -> torch.Tensor:
        """The domain's dual norm of each bound ``(B, R)`` (``rows``: where needed)."""
        if self.domain.w1:
            mask = None if rows is None else rows.detach().cpu().numpy()
            return _flownet.ball_norm(self._front_net, lin, mask, float32=float32)
        return self.domain.norm(self.q(lin))

    # ------------------------------------------------------------- bounds and oracle

    def layer_bounds(self, idx, eps: torch.Tensor, *, known=None, hint=None):
        """Pre-activation bounds ``{node: (lo, up)}`` on ``D_ε`` and the relaxations.

        ``known``: pre-activation node -> ``(lo, up)`` (flat, ``(B, n)``) already known to
        hold on the region (a subdomain's, e.g. split constraints); each node's bounds are
        intersected with them before they relax its activation and bound the nodes above
        (bounds that cross mean an empty region: returned as they are, relaxed as a
        point).  ``hint``: the same, finite only where it proves a (leaky) ReLU's input
        stable (:class:`~.probes.ProbeBounds`): no CROWN row is computed there; every
        other bound is the one computed without it, so the relaxations, whose lower
        slopes depend on the bounds, stay the same and no bound gets looser elsewhere."""
        graph = self.graph
        lo_in, up_in = self.domain.box(idx, eps, self.x)
        vals = {0: (self._model_input(lo_in, idx), self._model_input(up_in, idx))}
        bounds: dict[int, tuple] = {}
        relax: dict[int, tuple] = {}
        for i, node in enumerate(graph.nodes[1:], start=1):
            op = node.op
            ins = [vals[j] for j in node.inputs]
            if isinstance(op, act.Activation):
                lo, up = bounds[node.inputs[0]]
                up = torch.maximum(up, lo)
                relax[i] = op.relax(lo, up)
                vals[i] = op.interval(lo, up)
                if i in self.pre:  # an activation of an activation: monotone, exact enough
                    bounds[i] = vals[i]
                continue
            if isinstance(op, Merge):
                vals[i] = op.interval(*ins[0], *ins[1])
            else:
                vals[i] = op.interval(*ins[0])
            if i in self.pre:
                if hint is not None and i in hint and self._piecewise(i):
                    vals[i] = _intersect(*vals[i], *hint[i])
                bounds[i] = self._crown_bounds(idx, eps, i, *vals[i], relax)
                if known is not None and i in known:
                    bounds[i] = _intersect(*bounds[i], *known[i])
                vals[i] = bounds[i]
        return bounds, relax

    def _piecewise(self, i: int) -> bool:
        """Whether every activation reading node ``i`` is a (leaky) ReLU: only its unstable
        neurons need bounds, and a neuron proven stable needs no other."""
        return all(
            isinstance(n.op, act.LeakyReLUOp)
            for n in self.graph.nodes
            if i in n.inputs and isinstance(n.op, act.Activation)
        )

    def _front_bounds(self, idx, eps, i, lo, up):
        """Bounds of a node of the linear front from its rows ``±Q`` (exact for the balls)."""
        net = self._front()
        a, z = self._offsets[i]
        b, n = len(idx), z - a
        inv = self.inv_scale[idx]  # (B, C)
        centre = self._front_vals[idx][:, a:z]
        q = net.G[a:z].reshape(n, *self.x.shape[1:])
        if self.domain.w1:  # per-channel norms of the rows, scaled per image
            norm = (net.G_lip[a:z][None] * inv[:, None, :]).amax(dim=2)
        else:
            norm = self.domain.norm(q[None] * inv[:, None, :, None, None])
        new_lo, new_up = self._tighten(
            idx,
            eps,
            torch.cat([centre, -centre], dim=1),
            torch.cat([norm, norm], dim=1),
            _flownet.front_rows(net, a, z, inv),
            lo.reshape(b, n),
            up.reshape(b, n),
            torch.ones((b, n), dtype=torch.bool, device=lo.device),
            self._piecewise(i),
            key=i,
        )
        return new_lo.reshape(lo.shape), new_up.reshape(up.shape)

    def _tighten(self, idx, eps, centre, norm, q_rows, old_lo, old_up, valid, piecewise, **kw):
        """New bounds of ``k`` neurons from the linear lower bounds of ``[e_j; -e_j]``
        (``centre``, ``norm``: ``(B, 2k)``).

        The dual-norm (ball) bound first: cheap, and exact for the balls.  Over the
        polytope, the exact minimum where a neuron stays unstable; for piecewise-linear
        users lower bounds first, upper ones where still unstable (a neuron proven stable
        has an exact relaxation whatever its other bound).  ``q_rows(kk, rr)``: the
        image-space rows of the entries ``(kk[s], rr[s])`` (:meth:`~.domains.W1Polytope.
        gain_rows`); ``key``: the node, whose rows are the same on every call (the domain
        keeps their dual evaluations), or with ``sel`` (the neurons ``(B, k)`` of the rows)
        are the same neurons' (their evaluations start the next search; per batch entry
        in ``store`` if given; ``tol``: :meth:`~.domains.W1Polytope.gain_rows`)."""
        key, sel, store = kw.get("key"), kw.get("sel"), kw.get("store")
        k = old_lo.shape[1]

        def tighten(gain):
            val = centre - gain - _numerics._widen(centre, gain)
            new_lo = torch.where(valid, torch.maximum(old_lo, val[:, :k]), old_lo)
            new_up = torch.where(valid, torch.minimum(old_up, -val[:, k:]), old_up)
            return new_lo, torch.maximum(new_up, new_lo)

        new_lo, new_up = tighten(norm * eps[:, None])
        if self.domain.refines:
            slots = {}
            if sel is not None:  # row r is neuron sel[r % k], sign by r // k
                n = self.graph.nodes[key].size
                ids = torch.cat([sel, sel + n], dim=1).cpu().numpy()
                slots = dict(slots=(ids, 2 * n), same=False, store=store, tol=kw.get("tol"))
            halves = ((True, False), (False, True)) if piecewise else ((True, True),)
            for want_lo, want_up in halves:
                still = valid & ((new_lo < 0) & (new_up > 0) if piecewise else valid)
                if not bool(still.any()):
                    break
                rows = torch.cat([still & want_lo, still & want_up], dim=1)
                gain = self.domain.gain_rows(q_rows, eps, idx, rows, key=key, **slots)
                lo2, up2 = tighten(gain.to(centre.device, centre.dtype))
                new_lo, new_up = torch.maximum(new_lo, lo2), torch.minimum(new_up, up2)
                new_up = torch.maximum(new_up, new_lo)
        return new_lo, new_up

    def _crown_bounds(self, idx, eps, i, lo, up, relax, store=None, tol=None, row_alpha=None):
        """Tighten node ``i``'s bounds by CROWN where unstable (``store``, ``tol``:
        :meth:`_tighten`; ``row_alpha``: :func:`~.intermediate.row_slopes`)."""
        if i in self.front:
            return self._front_bounds(idx, eps, i, lo, up)
        node = self.graph.nodes[i]
        b, n = lo.shape[0], node.size
        lo_f, up_f = lo.reshape(b, n), up.reshape(b, n)
        piecewise = self._piecewise(i)
        need = (lo_f < 0) & (up_f > 0) if piecewise else torch.ones_like(lo_f, dtype=torch.bool)
        k = int(need.sum(dim=1).max()) if need.numel() else 0
        if k == 0:
            return lo, up
        groups = _groups(need.sum(dim=1))
        if groups is not None:  # rows are padded to the largest count: fewer per group
            lo, up = lo.clone(), up.clone()
            for g in groups:
                sub = {j: tuple(None if t is None else t[g] for t in r) for j, r in relax.items()}
                g_np = g.cpu().numpy()
                part, gi = None if store is None else store[g_np], np.asarray(idx)[g_np]
                lo[g], up[g] = self._crown_bounds(
                    gi, eps[g], i, lo[g], up[g], sub, part, tol, row_alpha
                )
                if part is not None:
                    store[g_np] = part
            return lo, up
        order = torch.sort(need.to(torch.int8), dim=1, descending=True, stable=True)
        sel, valid = order.indices[:, :k], order.values[:, :k].bool()
        one = valid.to(lo_f.dtype)
        front = _patches.patch_front(self, i)
        if front is not None:  # a convolution's rows stay on their windows
            return _patches.patch_bounds(self, idx, eps, i, front, (sel, valid), lo, up, relax)
        if isinstance(node.op, ConvOp) or (isinstance(node.op, LinearOp) and len(node.shape) == 1):
            # the first step in closed form: the selected neurons' rows
            relax = relax if not row_alpha else row_slopes(self.graph, relax, row_alpha, sel)
            lam_in, beta = node.op.unit_rows(torch.cat([sel, sel], 1), torch.cat([one, -one], 1))
            lin = self.linear(idx, node.inputs[0], lam_in, relax, beta=beta)
        else:
            lam = lo_f.new_zeros((b, 2 * k, n))
            lam[:, :k].scatter_(2, sel[..., None], one[..., None])
            lam[:, k:].scatter_(2, sel[..., None], -one[..., None])
            lin = self.linear(idx, i, lam.reshape(b, 2 * k, *node.shape), relax)
        norm = self.norm(lin, torch.cat([valid, valid], dim=1), float32=True)
        old = torch.gather(lo_f, 1, sel), torch.gather(up_f, 1, sel)
        args = (idx, eps, lin.centre, norm, lin.rows(self._front_net), *old, valid, piecewise)
        new_lo, new_up = self._tighten(*args, key=i, sel=sel, store=store, tol=tol)
        lo_f = lo_f.scatter(1, sel, new_lo)
        up_f = up_f.scatter(1, sel, new_up)
        return lo_f.reshape(lo.shape), up_f.reshape(up.shape)

    def _eps(self, idx, eps):
        idx = np.asarray(idx)
        eps_t = torch.as_tensor(np.asarray(eps, dtype=np.float64), device=self.device)
        return idx, eps_t.reshape(-1).expand(idx.size).clone()

    def margins(self, idx, eps: torch.Tensor):
        """Pre-activation bounds, relaxations and the margins' lower bounds (a
        :class:`~..flownet.Linear` on the front's rows) on ``D_ε``."""
        bounds, relax = self.layer_bounds(idx, eps)
        return bounds, relax, self.linear(idx, self.graph.output, self.spec[idx], relax)

    def _radii(
        self, lin: _flownet.Linear, eps_t, idx, *, grad: bool = False, signed: bool = False
    ) -> torch.Tensor:
        """Per-margin radii ``(B, m)`` of a relaxation valid up to ``eps_t``; with
        ``signed``, ``margin / ‖·‖`` (negative) where the margin is negative even at the
        image: no radius, but by how much the relaxation misses (a search signal)."""
        if grad:  # differentiable: the norm from the image-space rows
            q = self.q(lin)
            norm = self.domain.norm(q)
        else:
            norm = self.norm(lin)
        margin = lin.centre - _numerics.margin_tolerance(
            lin.centre.detach(), norm.detach() * eps_t[:, None]
        )
        if self.domain.refines and grad:
            rows = [
                _search._PolytopeRadius.apply(
                    q[k].flatten(1),
                    margin[k],
                    torch.zeros_like(margin[k]),
                    self.domain.mu[i].ravel(),
                    tuple(self.x.shape[1:]),
                )
                for k, i in enumerate(idx)
            ]
            return torch.stack(rows)
        if self.domain.refines:
            rad = self.domain.radius(self.q(lin), margin, idx)
        else:
            rad = torch.where(norm > 0, margin / norm.clamp(min=1e-300), math.inf)
            rad = torch.where(margin > 0, rad, torch.zeros_like(rad))
        if signed:
            miss = margin / norm.clamp(min=1e-300)
            rad = torch.where((margin < 0) & (norm > 0), miss, rad)
        return rad

    def __call__(self, idx, eps) -> np.ndarray:
        """``F(ε)`` per image (raw units): the radius certified by the relaxation at ε
        (with ``optimise``, the best over alpha-CROWN's slopes too); negative where the
        relaxation fails even at the image (``margin / ‖·‖``, a signal for the search)."""
        idx, eps_t = self._eps(idx, eps)
        with torch.no_grad():
            hint = self._seen.bounds(idx, eps_t)
            bounds, relax = self.layer_bounds(idx, eps_t, hint=hint)
            self._seen.add(idx, eps_t, bounds)
            lin = self.linear(idx, self.graph.output, self.spec[idx], relax)
            best = self._radii(lin, eps_t, idx, signed=True).min(dim=1).values
        if self.optimise:
            best = torch.maximum(best, _alpha.optimise(self, idx, eps_t, bounds, relax))
        return best.cpu().numpy()

    @torch.no_grad()
    def lower_bounds(self, idx, eps) -> np.ndarray:
        """Sound lower bounds ``(B, m)`` of the margins on ``D_ε`` (for tests and ``eps``)."""
        idx, eps_t = self._eps(idx, eps)
        _, _, lin = self.margins(idx, eps_t)
        gain = self.domain.gain(self.q(lin), eps_t, idx)
        val = lin.centre - gain - _numerics.margin_tolerance(lin.centre, gain)
        return val.cpu().numpy()


def _groups(counts: torch.Tensor):
    """Two groups of images (index tensors) by their count of rows, when bounding them
    apart saves a fifth of the padded rows (each image's rows are padded to the largest
    count of its group), else None."""
    b = counts.numel()
    if b < 4:
        return None
    c, order = torch.sort(counts)
    c = c.to(torch.float64)
    split = torch.arange(1, b, device=c.device)
    cost = split * c[:-1] + (b - split) * c[-1]
    s = int(torch.argmin(cost))
    if float(cost[s]) > 0.8 * b * float(c[-1]):
        return None
    return order[: s + 1], order[s + 1 :]


def _intersect(lo, up, k_lo, k_up):
    """``[lo, up] ∩ [k_lo, k_up]`` with ``k_*`` flat ``(B, n)`` (None: no bound)."""
    shape = lo.shape
    lo, up = lo.reshape(shape[0], -1), up.reshape(shape[0], -1)
    if k_lo is not None:
        lo = torch.maximum(lo, k_lo)
    if k_up is not None:
        up = torch.minimum(up, k_up)
    return lo.reshape(shape), up.reshape(shape)


def _front_map(graph: Graph, ends, image: torch.Tensor, device):
    """``(FlowNet, offsets)``: the rows of the front nodes ``ends`` stacked (see
    :meth:`EngineProblem._front`); ``image`` gives the input's shape."""
    blocks, offsets, at = [], {}, 0
    for j in ends:
        if j == 0:
            q = torch.eye(image.numel(), dtype=torch.float64, device=device)
        else:
            node = graph.nodes[j]
            eye = torch.eye(node.size, dtype=torch.float64, device=device)
            found, _ = backward(graph, j, eye.reshape(1, node.size, *node.shape), {})
            q = found[0].reshape(node.size, -1)
        blocks.append(q)
        offsets[j] = (at, at + q.shape[0])
        at += q.shape[0]
    g = torch.cat(blocks).cpu().numpy()
    net = _flownet.FlowNet(g, tuple(image.shape), device=device)
    shape = graph.nodes[ends[0]].shape if ends[0] != 0 else ()
    if len(ends) == 1 and len(shape) == 3:  # one node: is it a convolution of the image?
        tmpl = _flownet.conv_template(net, 0, g.shape[0], shape)
        if tmpl is not None:
            net.front_geo = _flownet.window_geometry(tmpl, [[0, 0]], (1, 1), shape[1:])
    return net, offsets
