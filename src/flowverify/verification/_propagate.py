r"""Sound pre-activation bounds over the flow polytope, CROWN-style (SPEC section 4).

For the chain ``z_1 = W_1 δ + b_1``, ``z_{k+1} = W_{k+1} relu(z_k) + b_{k+1}`` and the
domain ``P_U = {‖δ - δµ‖₁ ≤ U, R + Aδ ≥ 0}`` (Theorem 6; the ball alone without
feasibility), the bounds of ``z_1`` are exact (:class:`~._w1ball.InputDomain` solves the
LP ``min_{P_U} ± W_{1,j} g`` in closed form up to a 1-D search) and the bounds of
``z_k``, ``k ≥ 2``, come from backward linear relaxation (CROWN): every ReLU with bounds
``l < 0 < u`` is replaced by ``α z ≤ relu(z) ≤ s (z - l)``, ``s = u / (u - l)``, the
linear lower bound of ``Λ z_k`` is propagated to the input and minimised over ``P_U``
exactly.  Branch-and-bound splits (``+1``: ``z ≥ 0``, ``-1``: ``z ≤ 0``) make a neuron
linear.  Every number returned is a sound bound (rounding margins included).
"""

from __future__ import annotations

import numpy as np

from flowverify.verification._w1ball import InputDomain

__all__ = ["effective", "layer_bounds", "relaxation"]

_ROUND = 1e-10


def effective(lower: np.ndarray, upper: np.ndarray, split: np.ndarray | None):
    """Bounds of one layer after a split (``+1``: ``z ≥ 0``, ``-1``: ``z ≤ 0``)."""
    if split is None:
        return lower, upper
    lo = np.where(split > 0, np.maximum(lower, 0.0), lower)
    hi = np.where(split < 0, np.minimum(upper, 0.0), upper)
    return lo, hi


def relaxation(lower: np.ndarray, upper: np.ndarray):
    """Slopes of the ReLU relaxation: ``(alpha, s, intercept)``.

    ``relu(z) ≥ α z`` and ``relu(z) ≤ s z + intercept`` on ``[l, u]``; exact (``α = s``,
    intercept 0) for stable neurons.  ``α = 1`` when ``u > -l`` (CROWN's choice).
    """
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    width = np.where(unstable, upper - lower, 1.0)
    s = np.where(unstable, upper / width, np.where(active, 1.0, 0.0))
    intercept = np.where(unstable, -s * lower, 0.0)
    alpha = np.where(unstable, (upper > -lower).astype(float), np.where(active, 1.0, 0.0))
    return alpha, s, intercept


def _backward(weights, biases, relax, c1, domain: InputDomain, lam, const, k):
    """Lower bounds of ``lam · z_k + const`` (``lam`` has rows over the neurons of z_k)."""
    for i in range(k - 1, -1, -1):
        alpha, s, intercept = relax[i]
        pos = lam >= 0
        lam_z = np.where(pos, lam * alpha, lam * s)
        const = const + np.where(pos, 0.0, lam * intercept).sum(axis=1)
        if i == 0:
            return const + lam_z @ c1 + domain.min_linear(lam_z)
        const = const + lam_z @ biases[i]
        lam = lam_z @ weights[i]
    raise AssertionError("unreachable")


def layer_bounds(
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    c1: np.ndarray,
    domain: InputDomain,
    *,
    splits: list[np.ndarray] | None = None,
    prev: list[tuple[np.ndarray, np.ndarray]] | None = None,
    start: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    r"""Sound bounds ``(l_k, u_k)`` of every hidden pre-activation over ``P_U``.

    Parameters
    ----------
    weights, biases : list of ndarray
        The chain (``c1 = W_1 δµ + b_1`` is the first layer at ``g = 0``).
    domain : InputDomain
        ``P_U`` (radius and feasibility).
    splits : list of int8 arrays, optional
        Per hidden layer, ``+1`` / ``-1`` / ``0``; the bounds returned are those of the
        sub-domain (splits applied).
    prev : list of (l, u), optional
        Bounds known to hold (e.g. of the parent node); results are intersected with them
        and layers ``< start`` are taken from ``prev`` unchanged.
    start : int
        First hidden layer to recompute.

    Returns
    -------
    list of (l, u)
        One pair per hidden layer (``len(weights) - 1``).
    """
    n_hidden = len(weights) - 1
    out: list[tuple[np.ndarray, np.ndarray]] = []
    relax = []
    for k in range(n_hidden):
        sp = None if splits is None else splits[k]
        if k < start and prev is not None:
            lo, hi = prev[k]
        elif k == 0:
            n = weights[0].shape[0]
            eye = np.eye(n)
            vals = domain.min_linear(np.vstack([eye, -eye]))
            lo = c1 + vals[:n]
            hi = c1 - vals[n:]
            lo = lo - _ROUND * (1.0 + np.abs(lo))
            hi = hi + _ROUND * (1.0 + np.abs(hi))
        else:
            w, b = weights[k], biases[k]
            n = w.shape[0]
            if prev is not None:
                # stable neurons stay stable: only the unstable ones are recomputed
                rows = np.nonzero((prev[k][0] < 0) & (prev[k][1] > 0))[0]
            else:
                rows = np.arange(n)
            lo = np.full(n, -np.inf) if prev is None else prev[k][0].copy()
            hi = np.full(n, np.inf) if prev is None else prev[k][1].copy()
            if rows.size:
                lam = np.vstack([w[rows], -w[rows]])
                const = np.concatenate([b[rows], -b[rows]])
                vals = _backward(weights, biases, relax, c1, domain, lam, const, k)
                m = rows.size
                new_lo = vals[:m] - _ROUND * (1.0 + np.abs(vals[:m]))
                new_hi = -vals[m:] + _ROUND * (1.0 + np.abs(vals[m:]))
                lo[rows] = new_lo
                hi[rows] = new_hi
        if prev is not None:
            lo = np.maximum(lo, prev[k][0])
            hi = np.minimum(hi, prev[k][1])
        # An empty interval (lo > hi) means the sub-domain is empty; keep it as is, the
        # caller detects it.
        out.append((lo, hi))
        relax.append(relaxation(*effective(lo, hi, sp)))
    return out
