r"""Input domains of the engine: where a linear bound ``qᵀν + β`` is minimised.

Every bound the engine computes ends as a linear function of the image ``ν`` (data
units) with image-space coefficients ``q (B, R, C, H, W)``.  A domain around the image
``µ`` gives ``gain = max_{ν ∈ D} qᵀ(µ - ν)`` (so ``min qᵀν = qᵀµ - gain``) and the
largest radius at which a margin ``c`` survives:

========================  =====================================  =======================
domain                    gain                                   paper
========================  =====================================  =======================
``w1-ball``               ``ε ‖Aᵀq‖_∞`` (per channel: max)       Theorem 3 (vanilla)
``w1-polytope``           Kantorovich dual, L1 distance           Theorem 6 (feasible)
                          transform (exact)
``linf``/``l2``/``l1``    ``ε ‖q‖_1``, ``ε ‖q‖_2``, ``ε ‖q‖_∞``  image-space Lp balls
========================  =====================================  =======================

The W1 quantities are computed by the single implementations in
:mod:`~flowverify.verification.ball` (``_grad_absmax_t``) and
:mod:`~flowverify.verification.polytope` (:func:`~..polytope.polytope_gain`,
:func:`~..polytope.polytope_radius`).  ``ε`` is in raw units: flow L1 norm (W1 between the
images as given) for W1 domains, pixel units for the Lp balls.  The Lp balls do not clip
to ``[0, 1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowverify.verification import ball as _ball
from flowverify.verification import polytope as _polytope

__all__ = ["DOMAINS", "Domain", "make_domain"]

#: Memory a W1 polytope may keep per row family for its dual evaluations.
PLANES_BYTES = 2**28


class Domain:
    """A family of input regions ``D_ε(µ)`` around images ``µ (B, C, H, W)``."""

    name = ""
    #: A W1 region (images as mass: clipped at 0 like every W1 certifier).
    w1 = False

    def __init__(self, mu: np.ndarray):
        mu = np.asarray(mu, dtype=np.float64)
        self.mu = np.maximum(mu, 0.0) if self.w1 else mu

    def norm(self, q: torch.Tensor) -> torch.Tensor:
        """The dual norm ``(B, R)`` of the ball (``gain = ε · norm``)."""
        raise NotImplementedError

    #: Whether :meth:`gain` can be tighter than ``ε · norm`` (worth a second pass).
    refines = False

    def gain(self, q: torch.Tensor, eps: torch.Tensor, idx, rows=None) -> torch.Tensor:
        """``max_{ν ∈ D_ε} qᵀ(µ - ν)`` (an upper bound), ``(B, R)``; ``idx``: image rows;
        ``rows (B, R)`` bool: where it is needed (a domain may return ``inf`` elsewhere)."""
        return self.norm(q) * eps[:, None]

    def radius(self, q: torch.Tensor, margin: torch.Tensor, idx) -> torch.Tensor:
        """Largest ``ε`` with ``gain(ε) <= margin`` (never above the exact one), ``(B, R)``;
        ``0`` where ``margin <= 0``, ``inf`` where no budget can use the margin up."""
        norm = self.norm(q)
        rad = torch.where(norm > 0, margin / norm.clamp(min=1e-300), math.inf)
        return torch.where(margin > 0, rad, torch.zeros_like(rad))

    def box(self, idx, eps: torch.Tensor, like: torch.Tensor):
        """Per-pixel bounds of ``ν`` (``(B, C, H, W)`` each) for interval arithmetic."""
        mu = torch.as_tensor(self.mu[idx], dtype=like.dtype, device=like.device)
        e = eps.reshape(-1, 1, 1, 1)
        return mu - e, mu + e


class W1Ball(Domain):
    """``{µ + Aγ : ‖γ‖_1 <= ε}`` (Theorem 3): the vanilla region."""

    name = "w1-ball"
    w1 = True

    def norm(self, q):
        b, r = q.shape[:2]
        return _ball._grad_absmax_t(q.reshape(b, r, -1), q.shape[2:])


class W1Polytope(W1Ball):
    """``{ν >= 0 : W1(µ, ν) <= ε}`` (Lemma 5, Theorem 6): the feasible region."""

    name = "w1-polytope"
    refines = True

    #: Dual evaluations kept per row of a ``key`` (:meth:`gain_rows`).
    PLANES = 4

    def __init__(self, mu: np.ndarray):
        super().__init__(mu)
        self._planes: dict = {}

    def gain(self, q, eps, idx, rows=None):
        """As :meth:`Domain.gain` (by :meth:`gain_rows`)."""
        b, r = q.shape[:2]
        mask = torch.ones((b, r), dtype=torch.bool) if rows is None else rows

        def q_rows(kk, rr):
            sel = q[torch.as_tensor(kk), torch.as_tensor(rr)]
            return sel.detach().cpu().numpy().reshape(kk.size, -1)

        return self.gain_rows(q_rows, eps, idx, mask).to(q.device, q.dtype)

    def gain_rows(
        self, q_rows, eps, idx, rows, key=None, *, slots=None, same=True, store=None, tol=None
    ):
        """The gains ``(B, R)`` of the rows where ``rows (B, R)`` (``inf`` elsewhere: no
        information, the caller keeps its ball bound there), from ``q_rows(kk, rr)``: the
        image-space rows ``(n, C*H*W)`` (float64) of the entries ``(kk[s], rr[s])``, or
        ``q_rows`` a tuple of :func:`~..flownet.sparse_rows` (rows on a sparse map).

        ``key``: names a family of rows whose dual evaluations are kept per image and slot
        to start the next call's search (:func:`~..polytope.polytope_gain_rows`); the slot
        of row ``(k, r)`` is ``r``, or ``ids[k, r]`` with ``slots = (ids, n_slots)``.
        ``same``: a slot always holds the same row (e.g. the rows of the linear front: the
        evaluations are bounds at any ``ε``); else only their ``θ`` start the search.
        ``store``: ``(B, n_slots, S, 3)``, the evaluations kept per batch entry instead
        of per image (a caller whose entries are subdomains of one image), updated.
        ``tol``: the dual search's tolerance (default :data:`~..polytope.THETA_TOL`)."""
        b, r = rows.shape
        out = np.full((b, r), np.inf)
        kk, rr = np.nonzero(rows.detach().cpu().numpy())
        if kk.size:
            tol = _polytope.THETA_TOL if tol is None else float(tol)
            e = eps.detach().cpu().numpy()[kk]
            img = np.asarray(idx)[kk]
            slot, n_slots = (rr, r) if slots is None else (slots[0][kk, rr], slots[1])
            if store is None:
                store = self._store(key, n_slots)
            else:  # kept per batch entry
                img = kk
            planes = None if store is None else store[img, slot]  # a copy: no races
            mu = self.mu[np.asarray(idx)]
            if isinstance(q_rows, tuple):
                out[kk, rr] = _polytope.polytope_gain_sparse_rows(
                    q_rows, kk, rr, mu, e, planes=planes, same=same, tol=tol
                )
            else:
                sel_q = np.ascontiguousarray(q_rows(kk, rr), dtype=np.float64)
                out[kk, rr] = _polytope.polytope_gain_rows(
                    sel_q, mu, kk, e, planes=planes, same=same, tol=tol
                )
            if store is not None:  # one write per (image, slot), even from several rows
                _, first = np.unique(img * n_slots + slot, return_index=True)
                store[img[first], slot[first]] = planes[first]
        return torch.as_tensor(out, dtype=torch.float64)

    def _store(self, key, r: int):
        """The planes of ``key`` (``(n_images, r, PLANES, 3)``), or None (no key, or above
        :data:`PLANES_BYTES`)."""
        if key is None or len(self.mu) * r * self.PLANES * 24 > PLANES_BYTES:
            return None
        store = self._planes.get(key)
        if store is None or store.shape[1] != r:
            store = self._planes[key] = np.full((len(self.mu), r, self.PLANES, 3), -1.0)
        return store

    def radius(self, q, margin, idx):
        b, r = q.shape[:2]
        q_np = q.detach().cpu().numpy().reshape(b * r, -1)
        m = np.maximum(margin.detach().cpu().numpy().reshape(-1), 0.0)
        img = np.repeat(np.arange(b), r)
        out = _polytope.polytope_radius_rows(q_np, self.mu[np.asarray(idx)], img, m).reshape(b, r)
        out = np.where(m.reshape(b, r) > 0, out, 0.0)
        return torch.as_tensor(out, dtype=q.dtype, device=q.device)

    def box(self, idx, eps, like):
        lo, up = super().box(idx, eps, like)
        return lo.clamp(min=0.0), up


class LinfBall(Domain):
    """``{ν : ‖ν - µ‖_∞ <= ε}`` (pixel units, no clipping)."""

    name = "linf"

    def norm(self, q):
        return q.abs().flatten(2).sum(dim=2)


class L2Ball(Domain):
    """``{ν : ‖ν - µ‖_2 <= ε}``."""

    name = "l2"

    def norm(self, q):
        return q.flatten(2).norm(dim=2) * (1.0 + 4 * q.shape[2:].numel() * 2.0**-53)


class L1Ball(Domain):
    """``{ν : ‖ν - µ‖_1 <= ε}``."""

    name = "l1"

    def norm(self, q):
        return q.abs().flatten(2).amax(dim=2)


#: Domain name -> class.
DOMAINS: dict[str, type[Domain]] = {
    d.name: d for d in (W1Ball, W1Polytope, LinfBall, L2Ball, L1Ball)
}


def make_domain(name: str, mu: np.ndarray) -> Domain:
    """The domain ``name`` (one of :data:`DOMAINS`) around images ``mu (B, C, H, W)``."""
    if name not in DOMAINS:
        raise ValueError(f"domain: expected one of {', '.join(DOMAINS)}, got {name!r}")
    return DOMAINS[name](mu)
