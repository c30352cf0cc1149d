r"""Sound linear relaxations of the element-wise activations.

For pre-activation bounds ``l <= z <= u`` each activation ``σ`` gets two lines per
neuron, ``s_lo z + b_lo <= σ(z) <= s_up z + b_up`` on ``[l, u]`` (the triangle of
CROWN, Zhang et al. 2018, for ReLU and its leaky variant; for the S-shaped Sigmoid and
Tanh, tangents and chords on the convex or concave side and otherwise slope
``min(σ'(l), σ'(u))``, the smallest derivative on ``[l, u]``, through the end points).
Every line is exact at the values it is built from; the S-shaped ones are widened by
``RELAX_ATOL`` for the rounding of ``σ`` in float64.

:func:`apply` replaces ``Λ σ(z)`` by the linear lower bound ``Λ⁺ (s_lo z + b_lo) + Λ⁻
(s_up z + b_up)``: the one place where a relaxation enters a bound (on the CPU without
gradients, for the ReLU family, through :func:`~.native.relu_lines`, the same sums in
one pass).
"""

from __future__ import annotations

import math

import torch

from flowverify.verification.engine import native as _native

__all__ = ["Activation", "LeakyReLUOp", "MaxPoolOp", "SigmoidOp", "TanhOp", "apply"]

#: Absolute widening of the S-shaped relaxations (float64 rounding of exp and tanh).
RELAX_ATOL = 1e-12


class Activation:
    """An element-wise non-linearity with a sound relaxation."""

    def to(self, device, dtype):
        return None

    def interval(self, lo, up):
        """Monotone: ``[σ(l), σ(u)]``."""
        return self.forward(lo), self.forward(up)

    def relax(self, lo, up, alpha=None):
        """``(s_lo, b_lo, s_up, b_up)``, each of ``lo``'s shape (``b_lo`` ``None``: 0)."""
        raise NotImplementedError


class LeakyReLUOp(Activation):
    """``max(z, a z)`` with ``0 <= a < 1`` (``a = 0``: ReLU).

    Upper line: the chord through ``(l, σ(l))`` and ``(u, σ(u))``; lower line through the
    origin with slope in ``[a, 1]`` (CROWN's adaptive choice ``1`` if ``u >= -l``, else
    ``a``; or ``alpha``, projected to ``[a, 1]``).  Stable neurons are exact.
    """

    def __init__(self, slope: float):
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"model: LeakyReLU slope must be in [0, 1), got {slope}")
        self.a = float(slope)

    def forward(self, z):
        return torch.where(z >= 0, z, self.a * z)

    def relax(self, lo, up, alpha=None):
        a = self.a
        active = lo >= 0
        inactive = up <= 0
        unstable = ~(active | inactive)
        fixed = torch.where(active, torch.ones_like(lo), torch.full_like(lo, a))
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        s_up = torch.where(unstable, (up - a * lo) / denom, fixed)
        b_up = torch.where(unstable, lo * (a - s_up), torch.zeros_like(lo))
        if alpha is None:
            lo_slope = torch.where(up >= -lo, torch.ones_like(lo), torch.full_like(lo, a))
        else:
            lo_slope = alpha.clamp(a, 1.0)
        s_lo = torch.where(unstable, lo_slope, fixed)
        return s_lo, None, s_up, b_up


class _SShaped(Activation):
    """Monotone, convex for ``z <= 0`` and concave for ``z >= 0``, ``σ'`` largest at 0."""

    def deriv(self, z):
        raise NotImplementedError

    def relax(self, lo, up, alpha=None):
        up = torch.maximum(up, lo)
        f_lo, f_up = self.forward(lo), self.forward(up)
        width = up - lo
        flat = width <= 1e-12 * (1.0 + lo.abs())
        chord = torch.where(flat, self.deriv(lo), (f_up - f_lo) / torch.where(flat, 1.0, width))
        mid = (lo + up) / 2
        tan_s = self.deriv(mid)
        tan_b = self.forward(mid) - tan_s * mid
        # mixed signs: slope k = min σ' on [l, u]; σ(z) - k z is non-decreasing there
        k = torch.minimum(self.deriv(lo), self.deriv(up))
        convex = up <= 0  # tangent below, chord above
        concave = lo >= 0  # chord below, tangent above
        s_lo = torch.where(convex, tan_s, torch.where(concave, chord, k))
        b_lo = torch.where(convex, tan_b, torch.where(concave, f_lo - chord * lo, f_lo - k * lo))
        s_up = torch.where(concave, tan_s, torch.where(convex, chord, k))
        b_up = torch.where(concave, tan_b, torch.where(convex, f_lo - chord * lo, f_up - k * up))
        tol = RELAX_ATOL * (1.0 + lo.abs() * s_lo.abs() + up.abs() * s_up.abs())
        return s_lo, b_lo - tol, s_up, b_up + tol


class SigmoidOp(_SShaped):
    """``1 / (1 + exp(-z))``."""

    def forward(self, z):
        return torch.sigmoid(z)

    def deriv(self, z):
        s = torch.sigmoid(z)
        return s * (1 - s)


class TanhOp(_SShaped):
    """``tanh(z)``."""

    def forward(self, z):
        return torch.tanh(z)

    def deriv(self, z):
        return 1 - torch.tanh(z) ** 2


def apply(
    lam: torch.Tensor, beta: torch.Tensor, relax, cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-bound ``Λ σ(z) + β`` by ``Λ' z + β'`` from a relaxation.

    ``lam (B, m, *S)``, ``beta (B, m)``; ``relax`` = ``(s_lo, b_lo, s_up, b_up)``, each
    ``(B, *S)`` (``b_lo`` may be ``None`` for a zero intercept; ``s_lo`` may be
    ``(B, m, *S)``: one lower slope per row, alpha-CROWN).  Each coefficient takes
    the lower line where it is non-negative and the upper line where it is negative.
    ``cols (B, m, P)``: ``lam (B, m, P)`` holds only the coefficients of the neurons
    ``cols`` (flat indices; the rows of a convolution as patches, :mod:`.patches`);
    ``(B, m/2, P)`` when rows ``r`` and ``r + m/2`` read the same neurons (the lines are
    gathered once for both).
    """
    s_lo, b_lo, s_up, b_up = relax
    b, m = lam.shape[:2]
    flat = lam.reshape(b, m, -1)
    n = flat.shape[2]
    if cols is not None:  # every line gathered per row at its neurons
        at, k = cols.reshape(b, -1), cols.shape[1]
        s_lo, b_lo, s_up, b_up = (
            None if t is None else t.reshape(b, -1).gather(1, at).reshape(b, k, n) for t in relax
        )
        if k != m:  # rows r and r + m/2 on the same neurons: the lines broadcast
            lines = [None if t is None else t[:, None] for t in (s_lo, b_lo, s_up, b_up)]
            out, beta = _lines(flat.reshape(b, 2, k, n), beta.reshape(b, 2, k), *lines)
            return out.reshape(lam.shape), beta.reshape(b, m)
    per_row = s_lo.dim() == lam.dim()  # alpha-CROWN (or patches): one lower slope per row
    if b_lo is None and not per_row and _native.usable(flat, beta, s_lo, s_up, b_up):
        lines = (t.reshape(b, n) for t in (s_lo, s_up, b_up))
        out, beta = _native.relu_lines(flat, beta, *lines)
        return out.reshape(lam.shape), beta
    s_lo = s_lo.reshape(b, m if per_row else 1, -1)
    if cols is None:
        s_up, b_up = s_up.reshape(b, 1, -1), b_up.reshape(b, -1)
    if b_lo is None and not per_row:
        # the lines differ only on unstable neurons: one dense product, then those columns
        loose = (s_lo != s_up)[:, 0] | (b_up != 0)
        width = int(loose.sum(dim=1).max()) if loose.numel() else 0
        if width <= n // 2:
            out = flat * s_up
            if width == 0:
                return out.reshape(lam.shape), beta
            order = torch.sort(loose.to(torch.int8), dim=1, descending=True, stable=True)
            cols, used = order.indices[:, :width], order.values[:, :width].to(flat.dtype)
            idx = cols[:, None, :].expand(b, m, width)
            part = flat.gather(2, idx)
            pos = part.clamp(min=0)
            d = (s_lo[:, 0].gather(1, cols) - s_up[:, 0].gather(1, cols)) * used
            out.scatter_add_(2, idx, pos * d[:, None, :])
            bu = b_up.gather(1, cols) * used
            beta = beta + torch.bmm(part - pos, bu[:, :, None])[..., 0]
            return out.reshape(lam.shape), beta
    out, beta = _lines(flat, beta, s_lo, b_lo, s_up, b_up)
    return out.reshape(lam.shape), beta


def _lines(flat, beta, s_lo, b_lo, s_up, b_up):
    """Each coefficient of ``flat (B, ..., n)`` on the lower line where it is
    non-negative and on the upper where it is negative: ``(Λ', β')``; lines per row
    (as many dimensions as ``flat``, broadcasting) or shared by the rows (``(B, n)``)."""
    neg = flat < 0
    out = flat * torch.where(neg, s_up, s_lo)
    lam_neg = torch.where(neg, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    beta = beta + _row_dot(lam_neg, b_up)
    if b_lo is not None:
        beta = beta + _row_dot(flat - lam_neg, b_lo)
    return out, beta


def _row_dot(lam: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ_j lam_{bmj} t_{bj}`` (``t (B, n)``) or ``Σ_j lam_{bmj} t_{bmj}`` (per row,
    ``t`` with as many dimensions as ``lam``, broadcasting)."""
    if t.dim() == lam.dim():
        return (lam * t).sum(dim=-1)
    return torch.bmm(lam, t.reshape(t.shape[0], -1, 1))[..., 0]


class MaxPoolOp(Activation):
    """``nn.MaxPool2d``: each output is the largest input of its window.

    Relaxation (per output ``o`` with window ``W_o``): below by the input ``x_j*`` of the
    window with the largest lower bound; above by the same input when its lower bound
    reaches every other upper bound of the window (the max is then ``x_j*``), else by the
    constant ``max_{i ∈ W_o} u_i``.  :meth:`apply` carries ``Λ`` back to the input.
    """

    def __init__(self, pool, in_shape):
        if pool.return_indices:
            raise ValueError("model: MaxPool2d with return_indices=True is not supported")
        self.pool = pool
        self.in_shape = tuple(in_shape)
        self.kw = dict(
            kernel_size=pool.kernel_size,
            dilation=pool.dilation,
            padding=pool.padding,
            stride=pool.stride,
        )

    def forward(self, z):
        return self.pool(z)

    def _windows(self, t, fill):
        """``(B, C, K, L)``: the ``K`` entries of each of the ``L`` windows of ``t``."""
        b, c = t.shape[:2]
        pad = self.kw["padding"]
        pad = (pad, pad) if isinstance(pad, int) else pad
        t = torch.nn.functional.pad(t, (pad[1], pad[1], pad[0], pad[0]), value=fill)
        cols = torch.nn.functional.unfold(
            t.reshape(b * c, 1, *t.shape[2:]),
            self.kw["kernel_size"],
            dilation=self.kw["dilation"],
            stride=self.kw["stride"],
        )
        return cols.reshape(b, c, cols.shape[1], cols.shape[2])

    def relax(self, lo, up, alpha=None):
        b, c, h, w = lo.shape
        index = torch.arange(h * w, dtype=lo.dtype, device=lo.device).reshape(1, 1, h, w)
        idx_w = self._windows(index.expand(b, c, h, w).contiguous(), -1.0).long()
        lo_w = self._windows(lo, -math.inf)
        up_w = self._windows(up, -math.inf)
        best = lo_w.argmax(dim=2, keepdim=True)  # (B, C, 1, L)
        jstar = idx_w.gather(2, best)[:, :, 0]  # (B, C, L) flat index in the channel
        l_star = lo_w.gather(2, best)[:, :, 0]
        others = up_w.scatter(2, best, -math.inf).amax(dim=2)
        exact = l_star >= others
        ub = up_w.amax(dim=2)
        return jstar, exact, ub

    def apply(self, lam, beta, relax):
        """``Λ maxpool(x) + β`` -> ``Λ' x + β'`` (``lam (B, m, C, Ho, Wo)``)."""
        jstar, exact, ub = relax
        b, m = lam.shape[:2]
        c, h, w = self.in_shape
        flat = lam.reshape(b, m, c, -1)
        use = (flat >= 0) | exact[:, None]
        const = torch.where(use, torch.zeros_like(flat), flat)
        beta = beta + (const * ub[:, None]).flatten(2).sum(dim=2)
        out = flat.new_zeros((b, m, c, h * w))
        idx = jstar[:, None].expand(b, m, c, jstar.shape[-1])
        out.scatter_add_(3, idx, torch.where(use, flat, torch.zeros_like(flat)))
        return out.reshape(b, m, c, h, w), beta
