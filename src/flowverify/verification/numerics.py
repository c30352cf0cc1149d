"""Rounding margins of every bound, in one place: intermediate bounds are widened by
``BOUND_RTOL`` and a margin certifies only above ``MARGIN_RTOL (1 + |c| + ε‖a‖)``
(:func:`margin_tolerance`); and when the numba kernels run serially or in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["BOUND_RTOL", "MARGIN_RTOL", "PARALLEL_MIN_WORK", "margin_tolerance"]

#: Relative widening of every intermediate bound (float64 rounding of CROWN).
BOUND_RTOL = 1e-11
#: A margin lower bound certifies only above ``MARGIN_RTOL * (1 + |c| + eps * ||a||)``.
MARGIN_RTOL = 1e-9

_EPS64 = float(np.finfo(np.float64).eps)


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
