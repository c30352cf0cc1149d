r"""Flows, the flow application map and exact W1 (paper section 2, SPEC sections 1-2).

An image :math:`x \in \mathbb{R}_{\ge 0}^{C \times H \times W}` and a *flow*
:math:`\delta = (h, v)`, ``h`` of shape ``(C, H, W-1)`` and ``v`` of shape ``(C, H-1, W)``,
give the image

.. math::

    \Delta(x, \delta)_{c,i,j} = x_{c,i,j} + h_{c,i,j-1} + v_{c,i-1,j} - h_{c,i,j} - v_{c,i,j}
    = x + A\delta ,

with :math:`A` the sparse incidence matrix of the 4-neighbour grid (Theorem 2: the map is
affine; ``A``, ``Aᵀ`` and the matrix are implemented once, in
:mod:`flowverify.transport.grid`, and :func:`flow_dim` / :func:`incidence_matrix` are
re-exported here).  Flows are stored per channel as ``concat(h.ravel(), v.ravel())`` of
length ``D = H(W-1) + (H-1)W``; a batch of flows has shape ``(N, C, D)``.

Mass is conserved (Lemma 4: :math:`1^T A = 0`) and flows compose
(:math:`\Delta(\Delta(x,\delta_1),\delta_2) = \Delta(x, \delta_1+\delta_2)`).  Theorem 1
(Levine & Feizi, after Ling & Okada): for images of equal mass,

.. math::

    W_1(x, y) = \min \{ \|\delta\|_1 : y = \Delta(x, \delta) \}

with the L1 ground cost between pixel coordinates.  :func:`inverse_flow` computes such a
minimal flow exactly (a min-cost flow on the grid, see :mod:`flowverify.transport.mincostflow`) or
the flow of the paper's Algorithm 2 (corrected, SPEC section 2) from an exact OT plan.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowverify.core.validation import (
    Array,
    as_batch,
    check_array,
    check_finite_nonnegative,
    check_grid,
    like,
    to_float,
    to_numpy64,
)
from flowverify.transport.grid import adjoint, divergence, flow_dim, incidence_matrix

__all__ = [
    "INVERSE_METHODS",
    "apply_flow",
    "apply_flow_adjoint",
    "flow_dim",
    "grid_shape",
    "incidence_matrix",
    "inverse_flow",
    "w1_distance",
]

INVERSE_METHODS = ("minimal", "algorithm2")
W1_UNITS = ("normalised", "raw")

#: Relative tolerance on the equality of masses (per channel) of two images.
MASS_RTOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}


def grid_shape(flow_dim_: int) -> tuple[int, int]:
    """The square grid ``(H, H)`` whose flow dimension is ``flow_dim_`` (``2H(H-1)``).

    Raises ValueError if there is none; non-square grids need the image shape.
    """
    h = int(round((1 + np.sqrt(1 + 2 * flow_dim_)) / 2))
    if h < 1 or flow_dim(h, h) != flow_dim_:
        raise ValueError(
            f"flow: a flow dimension of {flow_dim_} is not 2H(H-1) for a square H x H grid; "
            "pass an image (or reference) to fix the grid shape"
        )
    return h, h


def _check_flow_shape(flow: Array, height: int, width: int, name: str = "flow") -> None:
    d = flow_dim(height, width)
    if flow.ndim < 1 or flow.shape[-1] != d:
        raise ValueError(
            f"{name}: expected a last axis of length D = H(W-1)+(H-1)W = {d} for a "
            f"{height}x{width} image, got shape {tuple(flow.shape)}"
        )


def apply_flow(x: Array, flow: Array) -> Array:
    r"""Apply a flow to an image: :math:`\Delta(x, \delta) = x + A\delta`, per channel.

    Parameters
    ----------
    x : ndarray or Tensor
        Images ``(N, C, H, W)``, or one image ``(C, H, W)`` / ``(H, W)``.
    flow : ndarray or Tensor
        Flows ``(N, C, D)`` (resp. ``(C, D)``, ``(D,)``) in the layout
        ``concat(h.ravel(), v.ravel())``; leading axes broadcast against ``x``
        (e.g. one reference image with a batch of flows).

    Returns
    -------
    ndarray or Tensor
        The image(s) ``x + A flow``, same kind as the inputs; differentiable in torch.
        Mass is unchanged (``1ᵀA = 0``); no sign constraint is enforced.

    Raises
    ------
    ValueError
        Naming ``x`` and/or ``flow``: an empty grid, a flow of the wrong length, leading
        axes that do not broadcast, NaN or infinite values (checked with one sum over the
        output; the inputs are only inspected when it is not finite).
    """
    check_array(x, "x")
    check_array(flow, "flow")
    if is_mixed(x, flow):
        raise TypeError(
            "x, flow: expected both numpy arrays or both torch tensors, got "
            f"{type(x).__name__} and {type(flow).__name__}"
        )
    if x.ndim < 2:
        raise ValueError(f"x: expected an image of rank >= 2, got shape {tuple(x.shape)}")
    check_grid(x, "x")
    height, width = x.shape[-2], x.shape[-1]
    _check_flow_shape(flow, height, width)
    try:
        np.broadcast_shapes(tuple(x.shape[:-2]), tuple(flow.shape[:-1]))
    except ValueError:
        raise ValueError(
            "x, flow: expected leading (batch, channel) axes that broadcast, got x of shape "
            f"{tuple(x.shape)} (leading {tuple(x.shape[:-2])}) and flow of shape "
            f"{tuple(flow.shape)} (leading {tuple(flow.shape[:-1])})"
        ) from None
    out = to_float(x) + divergence(to_float(flow), height, width)
    # NaN/inf in x or flow always reach the output (A has no cancelling entries), so one
    # sum over the output is the fast check; the inputs are only looked at when it fails.
    if not _finite_sum(out) and not _all_finite(out):
        for value, name in ((x, "x"), (flow, "flow")):
            if not _all_finite(value):
                raise ValueError(f"{name}: expected finite values, got NaN or infinity")
        raise ValueError(
            "x, flow: the flowed image overflows (non-finite pixels from finite x and flow); "
            "expected values well within the floating-point range"
        )
    return out


def _finite_sum(a: Array) -> bool:
    """Whether the sum of ``a`` is finite: True when every entry is, unless it overflows."""
    if isinstance(a, torch.Tensor):
        return math.isfinite(float(a.detach().sum())) if a.numel() else True
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(a.sum()))


def _all_finite(a: Array) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(a).all())


def is_mixed(a: Array, b: Array) -> bool:
    return isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor)


def apply_flow_adjoint(g: Array) -> Array:
    r"""The adjoint :math:`A^T g` of a pixel map ``g (..., H, W)``: a flow ``(..., D)``.

    ``(Aᵀg)`` for ``h[i, j]`` is ``g[i, j+1] - g[i, j]`` and for ``v[i, j]`` is
    ``g[i+1, j] - g[i, j]`` (a forward difference).  Used to fuse a first affine layer
    (``W̃ = W A`` has rows ``Aᵀ w``).
    """
    check_array(g, "g")
    return adjoint(g)


def _masses(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflowing mass is inf, checked by the callers
        return x.sum(axis=(-2, -1))


def _check_finite_mass(mass: np.ndarray, x: np.ndarray, name: str) -> None:
    """Raise ValueError if a channel's mass overflows (finite but huge pixels)."""
    if not np.isfinite(mass).all():
        raise ValueError(
            f"{name}: expected pixel values whose sum per channel is finite, got a mass that "
            f"overflows float64 (largest pixel {float(x.max()):g})"
        )


def _check_equal_mass(
    ref: np.ndarray,
    img: np.ndarray,
    dtype: np.dtype,
    names: tuple[str, str] = ("reference", "image"),
    hint: str = "scale the reference to the image's mass (flowverify.make_reference does)",
) -> None:
    """Raise ValueError unless ``ref`` and ``img`` have equal (finite) mass per channel.

    ``names`` are the argument names used in the message, ``hint`` what to do about it.
    """
    mr, mi = _masses(ref), _masses(img)
    _check_finite_mass(mr, ref, names[0])
    _check_finite_mass(mi, img, names[1])
    mr, mi = np.broadcast_arrays(mr, mi)
    rtol = MASS_RTOL.get(np.dtype(dtype), 1e-5)
    bad = np.abs(mr - mi) > rtol * np.maximum(np.maximum(np.abs(mr), np.abs(mi)), 1e-300)
    if bad.any():
        n, c = np.argwhere(bad)[0]
        a, b = names
        raise ValueError(
            f"{a}, {b}: expected equal mass per channel (relative tolerance {rtol:g}), got "
            f"{a} mass {mr[n, c]:.10g} and {b} mass {mi[n, c]:.10g} (image {n}, channel {c}); "
            f"{hint}"
        )


def _balanced_supply(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    """``img - ref`` with any rounding imbalance spread uniformly (sums to 0 exactly-ish)."""
    supply = img - ref
    hw = supply.shape[-1] * supply.shape[-2]
    return supply - supply.sum(axis=(-2, -1), keepdims=True) / hw


def inverse_flow(reference: Array, image: Array, *, method: str = "minimal") -> Array:
    r"""A right inverse of the flow map: a flow ``δ`` with ``Δ(reference, δ) = image``.

    Parameters
    ----------
    reference : ndarray or Tensor
        Reference ``R``, ``(N, C, H, W)`` or one image ``(C, H, W)`` / ``(H, W)`` /
        ``(1, C, H, W)`` broadcast over the batch; non-negative, with the image's mass in
        every channel.
    image : ndarray or Tensor
        Images ``µ`` ``(N, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``), non-negative.
    method : {"minimal", "algorithm2"}
        ``"minimal"``: the exact minimum-L1 flow (a min-cost flow on the 4-neighbour grid),
        so ``||δ||_1 = W1(R, µ)`` (Theorem 1).  ``"algorithm2"``: the paper's Algorithm 2
        (SPEC section 2): an exact OT plan from POT, each transported mass routed along
        the source row, then along the target column.

    Returns
    -------
    ndarray or Tensor
        Flows ``(N, C, D)`` (rank follows ``image``), same kind, dtype and device as
        ``image``; computed in float64.
    """
    if method not in INVERSE_METHODS:
        raise ValueError(
            f"method: unknown inverse_flow method {method!r}; valid methods: "
            f"{', '.join(INVERSE_METHODS)}"
        )
    ref_b, _ = as_batch(reference, "reference")
    img_b, rank = as_batch(image, "image")
    check_finite_nonnegative(ref_b, "reference")
    check_finite_nonnegative(img_b, "image")
    if ref_b.shape[1:] != img_b.shape[1:] or ref_b.shape[0] not in (1, img_b.shape[0]):
        raise ValueError(
            "reference: expected shape (C, H, W) or (N, C, H, W) matching the image "
            f"{tuple(img_b.shape)}, got {tuple(ref_b.shape)}"
        )
    dtype = to_numpy_dtype(image)
    ref64, img64 = to_numpy64(ref_b), to_numpy64(img_b)
    _check_equal_mass(ref64, img64, dtype)
    ref64 = np.broadcast_to(ref64, img64.shape)
    n, c, height, width = img64.shape
    if method == "minimal":
        flows = _minimal_flows(ref64, img64)
    else:
        flows = _algorithm2_flows(ref64, img64)
    return restore_flow_rank(like(flows.reshape(n, c, flow_dim(height, width)), image), rank)


def restore_flow_rank(flow: Array, rank: int) -> Array:
    """Flows ``(N, C, D)`` back to the rank of the caller's image."""
    if rank == 4:
        return flow
    if rank == 3:
        return flow[0]
    return flow[0, 0]


def to_numpy_dtype(x: Array) -> np.dtype:
    if isinstance(x, torch.Tensor):
        return np.dtype(np.float32) if x.dtype != torch.float64 else np.dtype(np.float64)
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)


def _minimal_flows(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    from flowverify.transport.mincostflow import grid_min_cost_flow

    n, c, height, width = img.shape
    if n * c == 0:
        return np.zeros((n, c, flow_dim(height, width)))
    supply = _balanced_supply(ref, img).reshape(n * c, height, width)
    flows, _ = grid_min_cost_flow(np.ascontiguousarray(supply))
    return flows.reshape(n, c, -1)


def _l1_cost_matrix(height: int, width: int) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    return (np.abs(ii[:, None] - ii[None, :]) + np.abs(jj[:, None] - jj[None, :])).astype(float)


def _algorithm2_flows(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Algorithm 2 (corrected): route each entry of an exact OT plan row-then-column."""
    import ot

    n, c, height, width = img.shape
    cost = _l1_cost_matrix(height, width)
    out = np.zeros((n, c, flow_dim(height, width)))
    for b in range(n):
        for ch in range(c):
            a, t = ref[b, ch].ravel(), img[b, ch].ravel()
            mass = a.sum()
            if mass <= 0:
                continue
            plan = ot.emd(a / mass, t / mass, cost, numItermax=10_000_000) * mass
            out[b, ch] = _route_plan(plan, height, width)
    # Exact OT plans from POT have marginals equal to the inputs up to rounding; route the
    # small residual with the exact solver so that Δ(R, δ) = µ holds to machine precision.
    resid = img - apply_flow(ref, out)
    if np.abs(resid).max(initial=0.0) > 0:
        out = out + _minimal_flows(np.zeros_like(resid), resid)
    return out


def _route_plan(plan: np.ndarray, height: int, width: int) -> np.ndarray:
    src, dst = np.nonzero(plan)
    mass = plan[src, dst]
    i, j = np.divmod(src, width)
    k, l = np.divmod(dst, width)
    # Horizontal leg along row i from column j to l: +mass on h[i, j:l] if l > j,
    # -mass on h[i, l:j] if l < j.  Difference arrays + cumsum (one extra column).
    dh = np.zeros((height, width))
    sgn = np.sign(l - j)
    np.add.at(dh, (i, np.minimum(j, l)), sgn * mass)
    np.add.at(dh, (i, np.maximum(j, l)), -sgn * mass)
    h = np.cumsum(dh, axis=1)[:, :-1]
    # Vertical leg along column l from row i to k.
    dv = np.zeros((height, width))
    sgn = np.sign(k - i)
    np.add.at(dv, (np.minimum(i, k), l), sgn * mass)
    np.add.at(dv, (np.maximum(i, k), l), -sgn * mass)
    v = np.cumsum(dv, axis=0)[:-1, :]
    return np.concatenate([h.ravel(), v.ravel()])


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    """Each channel of ``x (N, C, H, W)`` divided by its mass (mass 1 per channel)."""
    mass = _masses(x)
    if not np.isfinite(mass).all():
        # finite but huge pixels: the sum overflows; scale by the largest pixel first
        peak = x.max(axis=(-2, -1), keepdims=True)
        x = x / np.where(peak > 0, peak, 1.0)
        mass = _masses(x)
    if (mass <= 0).any():
        raise ValueError(
            f"{name}: unit='normalised' needs positive mass in every channel, got a "
            "channel of mass 0 (all-zero image)"
        )
    return x / mass[..., None, None]


def w1_distance(x: Array, y: Array, *, unit: str = "normalised") -> Array:
    r"""Exact 1-Wasserstein distance with L1 ground cost, one value per image pair.

    .. math::

        W_1(x, y) = \sum_c \min\{\|\delta_c\|_1 : y_c = x_c + A\delta_c\}

    (mass never moves between channels; one pixel step costs 1).

    Parameters
    ----------
    x, y : ndarray or Tensor
        Images ``(N, C, H, W)`` (or ``(C, H, W)``, ``(H, W)``); one of them may be a single
        image broadcast over the other's batch.  Non-negative, finite.
    unit : {"normalised", "raw"}
        ``"normalised"``: each channel of each image is divided by its mass first (the
        unit of the paper and of the attack literature; a channel of zero mass is an
        error).  ``"raw"``: the images as they are; masses must be equal per channel.
        For mass ``s``, raw = ``s`` x normalised.

    Returns
    -------
    ndarray or Tensor
        Shape ``(N,)`` (a 0-d value for single images), the kind of ``x``, float64 for
        numpy, the floating dtype of ``x`` for torch.
    """
    if unit not in W1_UNITS:
        raise ValueError(f"unit: expected one of {', '.join(W1_UNITS)}, got {unit!r}")
    xb, rx = as_batch(x, "x")
    yb, ry = as_batch(y, "y")
    check_finite_nonnegative(xb, "x")
    check_finite_nonnegative(yb, "y")
    if xb.shape[1:] != yb.shape[1:] or (
        xb.shape[0] != yb.shape[0] and 1 not in (xb.shape[0], yb.shape[0])
    ):
        raise ValueError(
            f"x, y: expected images of the same shape (or one broadcast over the batch), "
            f"got {tuple(xb.shape)} and {tuple(yb.shape)}"
        )
    x64, y64 = np.broadcast_arrays(to_numpy64(xb), to_numpy64(yb))
    n, c, height, width = x64.shape
    if unit == "normalised":
        x64, y64 = _normalise(x64, "x"), _normalise(y64, "y")
    else:
        _check_equal_mass(
            x64,
            y64,
            to_numpy_dtype(x),
            names=("x", "y"),
            hint="unit='raw' compares images of the same mass; use unit='normalised' otherwise",
        )
    from flowverify.transport.mincostflow import grid_w1

    if n * c == 0:
        costs = np.zeros((n,))
    else:
        supply = _balanced_supply(x64, y64).reshape(n * c, height, width)
        costs = grid_w1(np.ascontiguousarray(supply)).reshape(n, c).sum(axis=1)
    out = costs if max(rx, ry) == 4 else costs[0]
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return torch.as_tensor(out, dtype=dtype, device=x.device)
    return np.asarray(out, dtype=np.float64)
