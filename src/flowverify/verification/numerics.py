"""Rounding margins of every bound, in one place: intermediate bounds are widened by
``BOUND_RTOL`` and a margin certifies only above ``MARGIN_RTOL (1 + |c| + ε‖a‖)``
(:func:`margin_tolerance`); the safe lower bound of an LP from any duals
(:func:`safe_lp_bound`); and when the numba kernels run serially or in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = [
    "BOUND_RTOL",
    "MARGIN_RTOL",
    "PARALLEL_MIN_WORK",
    "clean_duals",
    "margin_tolerance",
    "safe_lp_bound",
]

#: Relative widening of every intermediate bound (float64 rounding of CROWN).
BOUND_RTOL = 1e-11
#: A margin lower bound certifies only above ``MARGIN_RTOL * (1 + |c| + eps * ||a||)``.
MARGIN_RTOL = 1e-9

_EPS64 = float(np.finfo(np.float64).eps)
#: Relative rounding allowance of :func:`safe_lp_bound` (float64 sums of ~1e5 terms).
LP_ROUND = 2e-13


#: Below this much work (rows x pixels of the polytope kernels) a parallel kernel runs on
#: one thread: waking the thread pool costs milliseconds on a busy machine.
PARALLEL_MIN_WORK = 40_000


def _small_serial(kernel, work: int, *args):
    if work >= PARALLEL_MIN_WORK or numba.get_num_threads() == 1:
        return kernel(*args)
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(prev)


def _widen(centre, spread) -> torch.Tensor:
    return BOUND_RTOL * (1.0 + centre.abs() + spread.abs())


def margin_tolerance(centre, spread) -> torch.Tensor:
    """``MARGIN_RTOL * (1 + |c| + ε‖a‖)``: margins must exceed it to count as positive."""
    return MARGIN_RTOL * (1.0 + centre.abs() + spread.abs())


def clean_duals(y, row_lo, row_up) -> np.ndarray:
    """Row duals ``y`` made usable by :func:`safe_lp_bound`: a dual of the wrong sign on
    an infinite side of its row (which would give ``-inf``), or not finite, becomes 0."""
    y = np.array(y, dtype=np.float64)
    y = np.where((y > 0) & ~np.isfinite(row_lo), 0.0, y)
    y = np.where((y < 0) & ~np.isfinite(row_up), 0.0, y)
    return np.where(np.isfinite(y), y, 0.0)


def safe_lp_bound(cost, y, mty, amty, row_lo, row_up, col_lo, col_up) -> float:
    r"""A valid lower bound of ``min cᵀx`` s.t. ``row_lo <= Mx <= row_up``,
    ``col_lo <= x <= col_up`` (every column boxed) from *any* row duals ``y``.

    Neumaier & Shcherbina (2004): with ``d = c - Mᵀy``, for every feasible ``x``

    .. math::

        c^Tx = y^TMx + d^Tx \ge \sum_i \min(y_i L_i, y_i U_i) + \sum_j \min(d_j l_j, d_j u_j),

    so the solver's tolerances cannot inflate it.  ``mty = Mᵀy`` and ``amty = |M|ᵀ|y|``
    are the caller's (the matrix may be implicit); ``y`` must come from
    :func:`clean_duals`.  The float64 evaluation is covered by ``LP_ROUND`` times the
    magnitude of every term.
    """
    red = cost - mty
    row_part = np.where(
        y > 0,
        y * np.where(np.isfinite(row_lo), row_lo, 0.0),
        y * np.where(np.isfinite(row_up), row_up, 0.0),
    )
    col_part = np.where(red > 0, red * col_lo, red * col_up)
    total = float(row_part.sum() + col_part.sum())
    xmax = np.maximum(np.abs(col_lo), np.abs(col_up))
    rmax = np.where(np.isfinite(row_lo), np.abs(row_lo), 0.0)
    rmax = np.maximum(rmax, np.where(np.isfinite(row_up), np.abs(row_up), 0.0))
    err = (np.abs(cost) + amty) @ xmax + np.abs(y) @ rmax + abs(total)
    return total - LP_ROUND * (1.0 + float(err))
