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
and gives the radius oracle ``F(ε)`` of :func:`~..bounds.search_radius`: every margin
stays positive on ``D_ε'`` for ``ε' <= min(ε, F(ε))``, since the relaxations built at
``ε`` hold on every smaller region.  Intermediate bounds are widened by
:data:`~..bounds.BOUND_RTOL` and margins must exceed
:func:`~..bounds.margin_tolerance` before they count (float64 throughout).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import bounds as _b
from . import activations as act
from .affine import Merge
from .domains import Domain
from .graph import Graph

__all__ = ["EngineProblem", "backward"]


def backward(graph: Graph, start: int, lam: torch.Tensor, relax: dict) -> tuple:
    """Propagate ``Λ x_start`` to ``Λ' x_0 + β`` (a lower bound on the region).

    ``lam (B, m, *shape of node start)``; ``relax``: node position -> relaxation
    ``(s_lo, b_lo, s_up, b_up)`` of every activation below ``start``.
    Returns ``(lam_in (B, m, *input shape), beta (B, m))``.
    """
    beta = lam.new_zeros(lam.shape[:2])
    pending: dict[int, torch.Tensor] = {start: lam}

    def push(j, value):
        pending[j] = pending[j] + value if j in pending else value

    for i in range(start, 0, -1):
        lam_i = pending.pop(i, None)
        if lam_i is None:
            continue
        node = graph.nodes[i]
        op = node.op
        if isinstance(op, act.Activation):
            lam_i, beta = act.apply(lam_i, beta, relax[i])
            push(node.inputs[0], lam_i)
        elif isinstance(op, Merge):
            push(node.inputs[0], lam_i)
            push(node.inputs[1], op.sign * lam_i if op.sign != 1.0 else lam_i)
        else:
            beta = beta + op.bias(lam_i)
            push(node.inputs[0], op.backward(lam_i))
    lam0 = pending.pop(0, None)
    if lam0 is None:  # the node does not depend on the input
        lam0 = lam.new_zeros((*lam.shape[:2], *graph.nodes[0].shape))
    return lam0, beta


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

    def __init__(self, graph: Graph, x, labels, domain: Domain, *, inv_scale=None, device="cpu"):
        self.graph, self.domain = graph, domain
        self.device = torch.device(device)
        kw = {"dtype": torch.float64, "device": self.device}
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float64), **kw)
        n, c = self.x.shape[:2]
        inv = np.ones((n, c)) if inv_scale is None else np.asarray(inv_scale, np.float64)
        self.inv_scale = torch.as_tensor(np.broadcast_to(inv, (n, c)).copy(), **kw)
        spec = _b.margin_spec(labels, graph.num_classes)
        self.spec = torch.as_tensor(spec, **kw).reshape(n, spec.shape[1], *graph.nodes[-1].shape)
        self.pre = graph.pre_activations()

    @property
    def size(self) -> int:
        return self.x.shape[0]

    # ------------------------------------------------------------------ linear bounds

    def _model_input(self, nu: torch.Tensor, idx) -> torch.Tensor:
        u = nu * self.inv_scale[idx][:, :, None, None]
        return u.reshape(u.shape[0], *self.graph.nodes[0].shape)

    def _to_image(self, lam0: torch.Tensor, idx) -> torch.Tensor:
        """Coefficients on the model input -> on the image ``(B, R, C, H, W)``."""
        b, r = lam0.shape[:2]
        q = lam0.reshape(b, r, *self.x.shape[1:])
        return q * self.inv_scale[idx][:, None, :, None, None]

    def linear(self, idx, start: int, lam: torch.Tensor, relax: dict):
        """``q (B, R, C, H, W)`` and the value ``qᵀµ + β`` of ``Λ x_start``'s lower bound."""
        lam0, beta = backward(self.graph, start, lam, relax)
        q = self._to_image(lam0, idx)
        centre = (q.flatten(2) * self.x[idx].flatten(1)[:, None, :]).sum(dim=2) + beta
        return q, centre

    # ------------------------------------------------------------- bounds and oracle

    def layer_bounds(self, idx, eps: torch.Tensor):
        """Pre-activation bounds ``{node: (lo, up)}`` on ``D_ε`` and the relaxations."""
        graph = self.graph
        lo_in, up_in = self.domain.box(idx, eps, self.x)
        vals = {0: (self._model_input(lo_in, idx), self._model_input(up_in, idx))}
        scale_pos = bool((self.inv_scale >= 0).all())
        if not scale_pos:  # pragma: no cover - scales are masses, positive
            raise ValueError("inv_scale: expected positive scales")
        bounds: dict[int, tuple] = {}
        relax: dict[int, tuple] = {}
        for i, node in enumerate(graph.nodes[1:], start=1):
            op = node.op
            ins = [vals[j] for j in node.inputs]
            if isinstance(op, act.Activation):
                lo, up = bounds[node.inputs[0]]
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
                bounds[i] = self._crown_bounds(idx, eps, i, *vals[i], relax)
                vals[i] = bounds[i]
        return bounds, relax

    def _crown_bounds(self, idx, eps, i, lo, up, relax):
        """Tighten the interval bounds of node ``i`` by CROWN where they are unstable."""
        node = self.graph.nodes[i]
        b, n = lo.shape[0], node.size
        lo_f, up_f = lo.reshape(b, n), up.reshape(b, n)
        users = [
            self.graph.nodes[j].op
            for j in range(len(self.graph.nodes))
            if i in self.graph.nodes[j].inputs
        ]
        piecewise = all(
            isinstance(u, act.LeakyReLUOp) for u in users if isinstance(u, act.Activation)
        )
        need = (lo_f < 0) & (up_f > 0) if piecewise else torch.ones_like(lo_f, dtype=torch.bool)
        k = int(need.sum(dim=1).max()) if need.numel() else 0
        if k == 0:
            return lo, up
        order = torch.sort(need.to(torch.int8), dim=1, descending=True, stable=True)
        sel, valid = order.indices[:, :k], order.values[:, :k].bool()
        lam = lo_f.new_zeros((b, 2 * k, n))
        one = valid.to(lo_f.dtype)
        lam[:, :k].scatter_(2, sel[..., None], one[..., None])
        lam[:, k:].scatter_(2, sel[..., None], -one[..., None])
        q, centre = self.linear(idx, i, lam.reshape(b, 2 * k, *node.shape), relax)
        old_lo, old_up = torch.gather(lo_f, 1, sel), torch.gather(up_f, 1, sel)

        def tighten(gain):
            val = centre - gain - _b._widen(centre, gain)
            new_lo = torch.where(valid, torch.maximum(old_lo, val[:, :k]), old_lo)
            new_up = torch.where(valid, torch.minimum(old_up, -val[:, k:]), old_up)
            return new_lo, torch.maximum(new_up, new_lo)

        # the dual-norm (ball) bound first: cheap, and exact for the balls
        new_lo, new_up = tighten(self.domain.norm(q) * eps[:, None])
        if self.domain.refines:  # the exact polytope minimum where neurons stay unstable
            still = valid & ((new_lo < 0) & (new_up > 0) if piecewise else valid)
            if bool(still.any()):
                rows = torch.cat([still, still], dim=1)
                lo2, up2 = tighten(self.domain.gain(q, eps, idx, rows=rows))
                new_lo, new_up = torch.maximum(new_lo, lo2), torch.minimum(new_up, up2)
                new_up = torch.maximum(new_up, new_lo)
        lo_f = lo_f.scatter(1, sel, new_lo)
        up_f = up_f.scatter(1, sel, new_up)
        return lo_f.reshape(lo.shape), up_f.reshape(up.shape)

    def margins(self, idx, eps: torch.Tensor):
        """``q (B, m, C, H, W)`` and centres ``(B, m)`` of the margins' lower bounds."""
        _, relax = self.layer_bounds(idx, eps)
        return self.linear(idx, self.graph.output, self.spec[idx], relax)

    def _margins_at(self, idx, eps):
        idx = np.asarray(idx)
        eps_t = torch.as_tensor(np.asarray(eps, dtype=np.float64), device=self.device)
        eps_t = eps_t.reshape(-1).expand(idx.size).clone()
        return idx, eps_t, self.margins(idx, eps_t)

    @torch.no_grad()
    def __call__(self, idx, eps) -> np.ndarray:
        """``F(ε)`` per image (raw units): the radius certified by the relaxation at ε."""
        idx, eps_t, (q, centre) = self._margins_at(idx, eps)
        spread = self.domain.norm(q) * eps_t[:, None]
        margin = centre - _b.margin_tolerance(centre, spread)
        rad = self.domain.radius(q, margin, idx)
        return rad.min(dim=1).values.cpu().numpy()

    @torch.no_grad()
    def lower_bounds(self, idx, eps) -> np.ndarray:
        """Sound lower bounds ``(B, m)`` of the margins on ``D_ε`` (for tests and ``eps``)."""
        idx, eps_t, (q, centre) = self._margins_at(idx, eps)
        gain = self.domain.gain(q, eps_t, idx)
        val = centre - gain - _b.margin_tolerance(centre, gain)
        return val.cpu().numpy()
