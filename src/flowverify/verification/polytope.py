"""Exact minimisation of a linear function ``qᵀν`` over the W1 polytope ``{ν >= 0,
W1(µ, ν) <= ε}`` (Theorem 6) by its Kantorovich dual: the gain ``max qᵀ(µ - ν)``, the
largest ``ε`` keeping a margin positive, and the minimiser ``ν*`` (the transport plan),
for rows of coefficients (:mod:`.polytope_kernels` holds the kernels).
"""

from __future__ import annotations

import math

import numpy as np

from flowverify.verification.polytope_kernels import (
    THETA_TOL,
    _gain_rows,
    _plan_rows,
    _radius_rows,
    _sparse_gain_rows,
)

__all__ = [
    "THETA_ITERS",
    "THETA_TOL",
    "polytope_gain",
    "polytope_gain_rows",
    "polytope_gain_sparse_rows",
    "polytope_plan",
    "polytope_radius",
    "polytope_radius_rows",
]

#: Most steps of the search on the dual variable ``θ`` of the polytope bound (cutting
#: planes with a bisection every third step; it stops earlier when optimal to 1e-12).
THETA_ITERS = 40


def _sources_batch(mu: np.ndarray):
    """Sources of every image ``mu (B, P)`` as one array: ``src, mus, ptr``."""
    srcs = [_sources(row) for row in mu]
    ptr = np.zeros(len(srcs) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([s.size for s, _ in srcs])
    src = np.concatenate([s for s, _ in srcs]) if srcs else np.zeros(0, np.int64)
    mus = np.concatenate([v for _, v in srcs]) if srcs else np.zeros(0)
    return src.astype(np.int64), np.ascontiguousarray(mus, dtype=np.float64), ptr


def polytope_gain_rows(
    q,
    mu,
    img,
    eps,
    *,
    iters: int = THETA_ITERS,
    planes: np.ndarray | None = None,
    same=True,
    tol: float = THETA_TOL,
) -> np.ndarray:
    """:func:`polytope_gain` for rows of several images at once (one parallel kernel).

    ``q (m, C*H*W)``, ``mu (B, C, H, W)``, ``img (m,)``: the image of each row,
    ``eps (m,)``.  Returns ``(m,)``.  ``planes``: ``(m, S, 3)`` float64, the dual
    evaluations ``(θ, K(θ), T(θ))`` of each row kept between calls on the same rows and
    images (any ``ε``), updated in place; ``θ < 0`` marks an empty slot.  ``same=False``:
    the planes are of other rows (the same neurons' at another ``ε``, say): only their
    ``θ`` are used, as starting points.  ``tol``: the search stops once its value is
    proven within ``tol·(|gain| + ‖Aᵀq‖_∞ ε)`` of the optimum (sound for any ``tol``:
    every value is the dual's at some ``θ``; a looser one saves evaluations where a
    bound's last digits matter little, as a subdomain's intermediate bounds).
    """
    b, c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    tol = _tolerance(tol)
    src, mus, ptr = _sources_batch(np.asarray(mu, dtype=np.float64).reshape(b, -1))
    e = _per_row(eps, q.shape[0], "eps")
    img = np.ascontiguousarray(img, dtype=np.int64)
    return _gain_rows(q, src, mus, c, h, w, e, iters, ptr, img, planes, same, tol)


def polytope_gain_sparse_rows(
    rows: tuple,
    kk,
    rr,
    mu,
    eps,
    *,
    iters: int = THETA_ITERS,
    planes=None,
    same=True,
    tol: float = THETA_TOL,
) -> np.ndarray:
    """:func:`polytope_gain_rows` of the rows ``(kk[s], rr[s])`` of a family given by
    their entries on a sparse map (``rows``: :func:`~.flownet.sparse_rows`); row ``s``
    belongs to the image ``mu[kk[s]]``.  Each row is built and bounded on its window."""
    b, c, h, w = mu.shape
    src, mus, ptr = _sources_batch(np.asarray(mu, dtype=np.float64).reshape(b, -1))
    kk = np.ascontiguousarray(kk, dtype=np.int64)
    rr = np.ascontiguousarray(rr, dtype=np.int64)
    e = _per_row(eps, kk.size, "eps")
    args = (rows, kk, rr, src, mus, ptr, c, h, w, e, iters, planes, same, _tolerance(tol))
    return _sparse_gain_rows(*args)


def polytope_radius_rows(q, mu, img, margin, *, iters: int = THETA_ITERS) -> np.ndarray:
    """:func:`polytope_radius` for rows of several images at once (``extra = 0``)."""
    b, c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus, ptr = _sources_batch(np.asarray(mu, dtype=np.float64).reshape(b, -1))
    m = q.shape[0]
    marg = np.ascontiguousarray(np.broadcast_to(np.asarray(margin, np.float64), (m,)))
    img = np.ascontiguousarray(img, dtype=np.int64)
    return _radius_rows(q, src, mus, c, h, w, marg, np.zeros(m), iters, ptr, img)


def _sources(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src = np.flatnonzero(mu > 0).astype(np.int64)
    return src, np.ascontiguousarray(mu[src], dtype=np.float64)


def _rows(q: np.ndarray, p: int, name: str) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(q, dtype=np.float64))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != p:
        raise ValueError(f"{name}: expected shape (m, {p}), got {q.shape}")
    return q


def _tolerance(tol) -> float:
    tol = float(tol)
    if not (math.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"tol: expected a finite number >= 0, got {tol}")
    return tol


def _per_row(value, m: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (m,)).copy()
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ValueError(f"{name}: expected finite non-negative values")
    return arr


def polytope_gain(q: np.ndarray, mu: np.ndarray, eps, *, iters: int = THETA_ITERS) -> np.ndarray:
    r"""Sound upper bounds on :math:`\max\{q^T(\mu - \nu) : \nu \ge 0, W_1(\mu, \nu) \le
    \varepsilon\}`, one per row of ``q``.

    Parameters
    ----------
    q : ndarray
        ``(m, C*H*W)`` image-space coefficients, or one row.
    mu : ndarray
        The image ``(C, H, W)``, non-negative (data units).
    eps : float or ndarray
        Budgets ``ε`` (raw W1 units, i.e. flow L1 norm), scalar or ``(m,)``.
    iters : int
        Most search steps on the dual variable ``θ``.

    Returns
    -------
    ndarray
        ``(m,)``.  Equal (to 1e-12 relative, within ``iters`` steps) to the exact
        maximum, never below it; at most ``ε‖Aᵀq‖_∞`` (the L1-ball value).  The polytope
        minimum of the linear function ``qᵀν`` is ``qᵀµ - gain``.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    e = _per_row(eps, q.shape[0], "eps")
    return _gain_rows(q, src, mus, c, h, w, e, iters)


def polytope_radius(
    q: np.ndarray, mu: np.ndarray, margin, *, extra=0.0, iters: int = THETA_ITERS
) -> np.ndarray:
    r"""Largest :math:`\varepsilon` with :math:`\text{gain}_q(\varepsilon) + x\varepsilon \le
    m` (sound: the returned value never exceeds the exact one).

    ``margin`` ``m`` and ``extra`` ``x`` are per row (scalars broadcast).  ``inf`` when
    even moving all mass anywhere cannot use the margin up.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    m = q.shape[0]
    marg = np.broadcast_to(np.asarray(margin, dtype=np.float64), (m,)).copy()
    ext = _per_row(extra, m, "extra")
    return _radius_rows(q, src, mus, c, h, w, marg, ext, iters)


def polytope_plan(q: np.ndarray, mu: np.ndarray, eps, *, iters: int = THETA_ITERS) -> np.ndarray:
    r"""Images :math:`\nu \ge 0` with :math:`W_1(\mu,\nu) \le \varepsilon` (near-)minimising
    :math:`q^T\nu`, one per row: ``(m, C, H, W)``.  Same mass as ``mu``.

    The plan moves the mass of each pixel to the minimiser of the distance transform at
    the optimal ``θ``, mixing the plans on both sides of the kink so that its transport
    cost is at most ``ε``.
    """
    c, h, w = mu.shape
    q = _rows(q, c * h * w, "q")
    src, mus = _sources(np.asarray(mu, dtype=np.float64).ravel())
    e = _per_row(eps, q.shape[0], "eps")
    return _plan_rows(q, src, mus, c, h, w, e, iters).reshape(-1, c, h, w)
