"""Certified radii of a model in any input domain, on the engine: the W1 ball and polytope
(Theorems 3 and 6) and the image-space L∞, L2 and L1 balls, so that W1 and Lp
certification of the same network can be compared side by side."""

from __future__ import annotations

import copy

import numpy as np
import torch

from flowverify.verification.engine.crown import EngineProblem
from flowverify.verification.engine.domains import DOMAINS, make_domain
from flowverify.verification.engine.graph import build_graph
from flowverify.verification.search import search_radius

__all__ = ["domain_radii"]


def domain_radii(model, images, labels, *, domain: str = "linf", rtol: float = 1e-3):
    """Certified radii of a model's images in any input domain (CROWN on the engine).

    For comparing W1 with Lp certification of the same network.  ``model`` is an
    ``nn.Module`` taking images ``(N, C, H, W)``; ``images`` (data units), ``labels``
    ``(N,)``; ``domain`` one of :data:`~.domains.DOMAINS`.  Returns ``(N,)`` radii in the
    domain's raw unit (pixel units for ``linf``/``l2``/``l1``, raw W1 for the W1 domains;
    divide by the image mass for the normalised W1 unit): every image in the domain of
    that radius is classified ``labels`` (0 where even the image is not).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {', '.join(DOMAINS)}, got {domain!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol: expected a positive number, got {rtol!r}")
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) array, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("images: expected finite pixel values")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected {x.shape[0]} integer classes, got {labels.dtype} {labels.shape}"
        )
    graph = build_graph(copy.deepcopy(model).double().eval(), torch.as_tensor(x[:1]))
    if labels.min() < 0 or labels.max() >= graph.num_classes:
        raise ValueError(
            f"labels: expected classes in [0, {graph.num_classes}), got {labels.min()}.."
            f"{labels.max()}"
        )
    prob = EngineProblem(graph, x, labels, make_domain(domain, x))
    if domain.startswith("w1"):
        cap = x.sum(axis=(1, 2, 3)) * (x.shape[-1] + x.shape[-2] - 2)
    else:  # beyond this every pixel may take any value in [-cap, cap]: no real cap needed
        cap = np.full(x.shape[0], 1e6)
    res = search_radius(prob, cap, rtol=rtol, linear=not graph.activations())
    return res.lower
