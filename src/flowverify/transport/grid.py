r"""The linear operators of the 4-neighbour pixel grid: ``A``, its adjoint and its matrix.

A flow :math:`\delta = (h, v)` on an ``H x W`` grid holds one signed mass per edge:
``h[i, j]`` moves mass from pixel ``(i, j)`` to ``(i, j+1)``, ``v[i, j]`` from ``(i, j)``
to ``(i+1, j)`` (a negative value the other way).  Per channel it is stored as
``concat(h.ravel(), v.ravel())`` of length ``D = H(W-1) + (H-1)W``.  This module holds the
only implementations of

* the divergence :math:`A\delta` (:func:`divergence`), the change of the pixel values a
  flow causes, ``(Aδ)[i, j] = h[i, j-1] + v[i-1, j] - h[i, j] - v[i, j]``;
* the adjoint :math:`A^\top g` (:func:`adjoint`), the forward differences of a pixel map,
  ``g[i, j+1] - g[i, j]`` for ``h[i, j]`` and ``g[i+1, j] - g[i, j]`` for ``v[i, j]``;
* the sparse node-edge incidence matrix :math:`A` of one channel
  (:func:`incidence_matrix`).

:func:`divergence` and :func:`adjoint` take numpy arrays or torch tensors (differentiable),
batched over any leading axes, one channel per leading index.  They do not validate their
input; :func:`flowverify.transport.flows.apply_flow` and
:func:`~flowverify.transport.flows.apply_flow_adjoint` are the checked public forms.

Notes
-----
The flow map :math:`\Delta(R, \delta) = R + A\delta` is affine (Theorem 2) and conserves
mass (Lemma 4: :math:`1^\top A = 0`).  Theorem 1 (Ling & Okada) makes ``A`` the constraint
matrix of exact W1 with L1 ground cost,

.. math::

    W_1(x, y) = \min \{ \|\delta\|_1 : y = x + A\delta \},

and Corollary 2.1 fuses a first affine layer ``W`` of a classifier into the flow domain as
``W̃ = WA``, whose rows are :math:`A^\top w`.  Numba kernels that inline these operators for
speed name the function here that they mirror and are compared to it by the tests.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from flowverify.core.validation import Array

__all__ = [
    "adjoint",
    "divergence",
    "flow_dim",
    "incidence_matrix",
    "join_flow",
    "split_flow",
]


def flow_dim(height: int, width: int) -> int:
    """Number of flow coordinates per channel, ``D = H(W-1) + (H-1)W``."""
    return height * (width - 1) + (height - 1) * width


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def incidence_matrix(height: int, width: int) -> sp.csr_matrix:
    """The incidence matrix :math:`A` of one channel, ``x + A @ flow = Δ(x, flow)``.

    Parameters
    ----------
    height, width : int
        Grid size ``H``, ``W``.

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape ``(H*W, D)`` with ``D = H(W-1) + (H-1)W``.  The column of ``h[i, j]`` has
        -1 at pixel ``(i, j)`` and +1 at ``(i, j+1)``; the column of ``v[i, j]`` has -1 at
        ``(i, j)`` and +1 at ``(i+1, j)`` (pixels in row-major order).  ``1ᵀA = 0``.
    """
    height = _check_int(height, "height")
    width = _check_int(width, "width")
    pix = np.arange(height * width).reshape(height, width)
    src = np.concatenate([pix[:, :-1].ravel(), pix[:-1, :].ravel()])
    dst = np.concatenate([pix[:, 1:].ravel(), pix[1:, :].ravel()])
    d = src.size
    cols = np.concatenate([np.arange(d), np.arange(d)])
    rows = np.concatenate([src, dst])
    vals = np.concatenate([-np.ones(d), np.ones(d)])
    return sp.csr_matrix((vals, (rows, cols)), shape=(height * width, d))


def split_flow(flow: Array, height: int, width: int) -> tuple[Array, Array]:
    """The horizontal and vertical parts ``h (..., H, W-1)``, ``v (..., H-1, W)`` of flows
    ``(..., D)`` (views where possible)."""
    nh = height * (width - 1)
    lead = flow.shape[:-1]
    return (
        flow[..., :nh].reshape(*lead, height, width - 1),
        flow[..., nh:].reshape(*lead, height - 1, width),
    )


def join_flow(h: Array, v: Array) -> Array:
    """The flows ``(..., D)`` with horizontal part ``h (..., H, W-1)`` and vertical part
    ``v (..., H-1, W)``; the inverse of :func:`split_flow`."""
    if isinstance(h, torch.Tensor):
        return torch.cat([h.flatten(-2), v.flatten(-2)], dim=-1)
    lead = h.shape[:-2]
    return np.concatenate([h.reshape(*lead, -1), v.reshape(*lead, -1)], axis=-1)


def _pad(x: Array, pad: tuple[int, int, int, int]) -> Array:
    """Zero-pad the last two axes by (left, right, top, bottom)."""
    left, right, top, bottom = pad
    if isinstance(x, torch.Tensor):
        return F.pad(x, (left, right, top, bottom))
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, widths)


def divergence(flow: Array, height: int, width: int) -> Array:
    """``A flow``: the pixel map ``(..., H, W)`` of flows ``(..., D)`` (mass conserving).

    Numpy or torch (differentiable).  Equals ``incidence_matrix(H, W) @ flow`` per leading
    index; :func:`adjoint` is its adjoint.
    """
    h, v = split_flow(flow, height, width)
    out = _pad(h, (1, 0, 0, 0)) - _pad(h, (0, 1, 0, 0))
    return out + _pad(v, (0, 0, 1, 0)) - _pad(v, (0, 0, 0, 1))


def adjoint(g: Array) -> Array:
    """``Aᵀ g``: the flows ``(..., D)`` of forward differences of pixel maps ``(..., H, W)``.

    Numpy or torch (differentiable).  ``⟨A δ, g⟩ = ⟨δ, Aᵀ g⟩``; equals
    ``incidence_matrix(H, W).T @ g`` per leading index.
    """
    return join_flow(g[..., :, 1:] - g[..., :, :-1], g[..., 1:, :] - g[..., :-1, :])
