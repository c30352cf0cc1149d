"""Pre-activation bounds kept between the probes of a radius search.

Bounds computed on ``D_ε'`` hold on every smaller region ``D_ε ⊆ D_ε'`` (the W1 ball and
polytope grow with ``ε``, Theorems 3 and 6), so a later probe of the same image at
``ε <= ε'`` starts from them: a (leaky) ReLU input they prove stable needs no CROWN
row (the expensive part of a probe).  Sound for any ``ε' >= ε``; the smallest such
``ε'`` gives the tightest.  Used at the pre-activation nodes no other one depends on
(:attr:`ProbeBounds.last`: the last hidden layer of a chain), where the probe's bounds
are then exactly those computed without them, except for neurons proven stable only
by them (better); see :meth:`~.crown.EngineProblem.layer_bounds` (``hint``).  Only the
bounds of those nodes are kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ProbeBounds"]


class ProbeBounds:
    """The bounds of each probe of each image ``(ε, {node: (lo, up)})`` (flat rows)."""

    def __init__(self, graph, pre, device):
        self.device = device
        self.seen: dict[int, list] = {}
        above: list[set] = []  # the nodes each node depends on
        for node in graph.nodes:
            above.append(set().union(*[above[j] | {j} for j in node.inputs]))
        #: the pre-activation nodes no other one depends on: there the bounds of a stable
        #: neuron feed nothing but its (exact) relaxation, so reusing them changes no
        #: other bound; elsewhere they would feed interval arithmetic above, and a looser
        #: interval can end up as a looser CROWN bound (measured: 4.5% off one radius)
        self.last = [j for j in pre if not any(j in above[k] for k in pre if k != j)]
        self.sizes = {j: graph.nodes[j].size for j in self.last}

    def add(self, idx, eps: torch.Tensor, bounds: dict) -> None:
        """Keep the bounds ``{node: (lo, up)}`` (``(B, *shape)``) of a probe of ``idx`` at
        the nodes :attr:`last`."""
        e = eps.cpu().numpy()
        for k, i in enumerate(np.asarray(idx).tolist()):
            b = {j: (bounds[j][0][k].reshape(-1), bounds[j][1][k].reshape(-1)) for j in self.last}
            self.seen.setdefault(i, []).append((float(e[k]), b))

    def bounds(self, idx, eps: torch.Tensor) -> dict | None:
        """``{node: (lo, up)}`` (``(B, n)``) of the earlier probes at the smallest
        ``ε' >= ε`` of each image at the nodes :attr:`last`, where they prove a neuron
        stable (``∓inf`` elsewhere and for an image without one), or None."""
        e = eps.cpu().numpy()
        picks = []
        for k, i in enumerate(np.asarray(idx).tolist()):
            old = [(e2, b) for e2, b in self.seen.get(i, ()) if e2 >= e[k]]
            picks.append(min(old, key=lambda t: t[0])[1] if old else None)
        if all(p is None for p in picks):
            return None
        out = {}
        for j in self.last:
            n = self.sizes[j]
            inf = torch.full((n,), math.inf, dtype=torch.float64, device=self.device)
            lo = torch.stack([-inf if p is None else p[j][0] for p in picks])
            up = torch.stack([inf if p is None else p[j][1] for p in picks])
            stable = (lo >= 0) | (up <= 0)
            out[j] = (torch.where(stable, lo, -math.inf), torch.where(stable, up, math.inf))
        return out
