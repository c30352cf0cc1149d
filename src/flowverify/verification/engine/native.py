"""CPU fast paths (numba) of the engine's hottest float64 loops, used where no gradient
is wanted: each computes what its torch counterpart computes, in one pass over the
coefficients instead of several (and without their temporaries), the sums in another
order (vectorised; covered, as every float64 sum of CROWN whatever its order, by
``numerics.BOUND_RTOL``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from flowverify.verification.numerics import _small_serial

__all__ = ["relu_lines", "row_dot", "usable"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fast paths may run: float64 on the CPU, no gradient wanted."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float64 and not t.requires_grad for t in tensors
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def relu_lines(flat, beta, s_lo, s_up, b_up):
    """:func:`~.activations.apply` with lines shared by the rows and no lower intercept
    (the ReLU family): each coefficient of ``flat (B, m, n)`` on the lower line ``s_lo``
    where it is non-negative and on the upper line ``(s_up, b_up)`` where negative (lines
    ``(B, n)``); returns ``(Λ', β')``."""
    out, new_beta = _small_serial(
        _relu_lines, flat.numel() // 4, _np(flat), _np(beta), _np(s_lo), _np(s_up), _np(b_up)
    )
    return torch.from_numpy(out), torch.from_numpy(new_beta)


def row_dot(lam, vals):
    """``Σ_k lam_{brk} vals_{bk}`` ``(B, m)`` for ``lam (B, m, n)``, ``vals (B, n)``: each
    row summed alone, in the same order whatever the batch."""
    return torch.from_numpy(_small_serial(_row_dot, lam.numel() // 4, _np(lam), _np(vals)))


#: Sums may be reassociated (vectorised) and products fused into them: exact products
#: and selections, sums in another order; NaN and inf as in IEEE arithmetic.
_SUMS = {"reassoc", "contract"}


@numba.njit(cache=True, parallel=True, fastmath=_SUMS)
def _relu_lines(flat, beta, s_lo, s_up, b_up):
    nb, m, n = flat.shape
    out = np.empty_like(flat)
    new_beta = beta.copy()
    for t in numba.prange(nb * m):
        b, r = t // m, t % m
        acc = 0.0
        for k in range(n):  # branch-free: the loop vectorises
            v = flat[b, r, k]
            neg = v < 0.0
            out[b, r, k] = v * (s_up[b, k] if neg else s_lo[b, k])
            acc += v * b_up[b, k] if neg else 0.0
        new_beta[b, r] += acc
    return out, new_beta


@numba.njit(cache=True, parallel=True, fastmath=_SUMS)
def _row_dot(lam, vals):
    nb, m, n = lam.shape
    out = np.empty((nb, m))
    for t in numba.prange(nb * m):
        b, r = t // m, t % m
        acc = 0.0
        for k in range(n):
            acc += lam[b, r, k] * vals[b, k]
        out[b, r] = acc
    return out
