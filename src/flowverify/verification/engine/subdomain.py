"""The records of branch and bound on ReLU splits (:mod:`.bab`): a subdomain (its splits,
warm-start multipliers, open margins, bound and refined intermediate bounds), a fixed-ε
decision and an exact-radius search's bracket."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["BabDecision", "BabRadius"]


@dataclass
class _Sub:
    """A subdomain: the splits ``{activation: (n,) int8}``, warm-start ``α`` (per
    activation ``(m, n)`` float32) and ``β`` (:func:`pack`'d), the margins still to prove
    (``open (m,)``) and its current bound (worst open margin)."""

    splits: dict
    alpha: dict | None = None
    beta: dict | None = None
    open: torch.Tensor | None = None
    bound: float = -math.inf
    depth: int = 0
    #: refined pre-activation bounds ``{relu: (lo (n,), up (n,))}`` at ``ε`` (sound on
    #: the subdomain) and the first ReLU whose bounds no longer reflect the splits above
    #: (0: none)
    bounds: dict | None = None
    eps: float = math.nan
    stale: int = 0
    #: per refined ReLU, the last bracket ``(θ_a, θ_b)`` of each of its rows' polytope
    #: dual (``(2n, 2)``: lower rows, then upper), a child's first points to evaluate
    theta: dict = field(default_factory=dict)
    #: proven radii (raw) per margin ``(m,)``: margin ``t`` is positive on ``D_ε`` ∩ the
    #: subdomain for every ``ε <= mrad[t]`` (its own bounds' or an ancestor's)
    mrad: torch.Tensor | None = None
    #: ``mrad.min()``: every margin is positive on ``D_radius`` ∩ the subdomain
    radius: float = 0.0
    #: its two children once split (kept across decisions: :mod:`.bab_search`), and the
    #: smallest ``ε`` at which its own bound left a margin open
    kids: list | None = None
    failed: float = math.inf


@dataclass
class BabDecision:
    """Outcome of :meth:`SplitBab.decide` at one ``ε`` (raw units).

    ``status``: ``certified`` (every subdomain closed: no image of ``D_ε`` is
    misclassified), ``falsified`` (``witness``, an image of ``D_ε`` the model
    misclassifies, at W1 ``witness_w1`` from the image, re-checked by the caller) or
    ``unknown`` (``message`` says why).  The search tree stays with the
    :class:`~.bab.SplitBab` for its next decision.
    """

    status: str
    nodes: int
    witness: np.ndarray | None = None
    message: str = ""
    worst: float = -math.inf
    #: ``unknown``: the smallest proven radius (raw) of the subdomains left open, a
    #: radius proven on the whole search space
    proven: float = 0.0


@dataclass
class BabRadius:
    """Outcome of :meth:`SplitBab.radius`: ``lower`` proven, ``upper`` the W1 of the
    closest misclassified image found (``witness``), ``exact`` when ``upper <= lower
    (1 + rtol)``; ``nodes`` bounded; ``message`` when the bracket stayed open."""

    lower: float
    upper: float
    witness: np.ndarray | None
    exact: bool
    nodes: int
    seconds: float
    message: str = ""


def pack(t: torch.Tensor, keep: torch.Tensor) -> tuple:
    """A warm start ``t (m, n)`` kept on the neurons ``keep (n,)`` only, in float32:
    ``(idx (k,), vals (m, k))`` (a subdomain's ``β`` on its split neurons, zero
    elsewhere).  A leaf of the search tree keeps its multipliers until it is bounded
    again, so they are most of the tree's memory."""
    idx = torch.nonzero(keep).flatten()
    return idx, t[:, idx].to(torch.float32)


def unpack(packed: tuple, out: torch.Tensor) -> None:
    """Write a :func:`pack`'d warm start into ``out (m, n)`` (its other entries kept)."""
    idx, vals = packed
    out[:, idx] = vals.to(out.dtype)


def theta_store(subs: list, i: int, n: int) -> np.ndarray:
    """The brackets :attr:`_Sub.theta` of ReLU ``i`` (``n`` neurons) of the subdomains
    ``subs`` as the ``store`` of :meth:`~.crown.EngineProblem._tighten` (``(D, 2n, 2, 3)``:
    per row its left and right point, ``θ < 0`` where none is known)."""
    store = np.full((len(subs), 2 * n, 2, 3), -1.0)
    for k, sub in enumerate(subs):
        if i in sub.theta:
            store[k, :, :, 0] = sub.theta[i]
    return store


def keep_theta(subs: list, i: int, store: np.ndarray) -> None:
    """Keep each subdomain's new brackets of ReLU ``i`` from ``store`` (a new dict: a
    parent's is shared by its children)."""
    for k, sub in enumerate(subs):
        sub.theta = {**sub.theta, i: store[k, :, :, 0].astype(np.float32)}
