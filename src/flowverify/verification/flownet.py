"""The flow-domain network's linear front (Corollary 2.1): image-space rows ``G`` of the
first affine layers (:class:`FlowNet`; :func:`flow_to_image_weights` writes flow-space
rows ``W̃ = WA/s`` so), a linear bound ``Λ z_0 + β`` on them (:class:`Linear`), its ball
dual norm (:func:`ball_norm`) and its image-space rows for the polytope
(:func:`front_rows`, :func:`sparse_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowverify.transport.flows import apply_flow_adjoint, flow_dim
from flowverify.verification.ball import (
    _F32_SAFE,
    _folded_lip,
    _grad_absmax_t,
    _lam_g_lip,
    _lam_g_lip_csr,
    row_boxes,
)
from flowverify.verification.numerics import _EPS64, _small_serial

__all__ = [
    "FlowNet",
    "Linear",
    "ball_norm",
    "flow_to_image_weights",
    "front_rows",
    "margin_spec",
    "sparse_rows_norm",
    "sparse_rows",
]


def flow_to_image_weights(
    weight: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    r"""Write flow-space rows ``w`` (``(n, C*D)``) as ``Aᵀg + e``: image maps and residuals.

    Every fused first layer has rows :math:`A^T g` (Corollary 2.1); ``g`` is recovered
    by integrating the forward differences (up to a constant per channel, irrelevant
    because flows preserve mass).

    Returns
    -------
    g : ndarray
        ``(n, C*H*W)``.
    resid : ndarray
        ``(n,)``: ``max_j |w - Aᵀg|`` per row plus a rounding allowance, so that
        ``|(w - Aᵀg)ᵀγ| <= resid ‖γ‖₁`` for every flow ``γ``.
    """
    c, h, w = shape
    d = flow_dim(h, w)
    weight = np.asarray(weight, dtype=np.float64)
    n = weight.shape[0]
    if weight.shape[1] != c * d:
        raise ValueError(
            f"weight: expected {c * d} columns for a {shape} image, got {weight.shape}"
        )
    wc = weight.reshape(n, c, d)
    nh = h * (w - 1)
    hflow = wc[..., :nh].reshape(n, c, h, w - 1)
    vflow = wc[..., nh:].reshape(n, c, h - 1, w)
    g = np.zeros((n, c, h, w))
    g[..., 0, 1:] = np.cumsum(hflow[..., 0, :], axis=-1)
    g[..., 1:, :] = g[..., :1, :] + np.cumsum(vflow, axis=-2)
    # the constant per channel is free: take the median (0 outside a convolution's
    # receptive field, so that such rows stay sparse) and drop rounding dust (the
    # residual below accounts for it exactly)
    g -= np.median(g.reshape(n, c, -1), axis=-1)[..., None, None]
    scale = np.abs(g).reshape(n, -1).max(axis=1, initial=0.0)
    g[np.abs(g) <= 1e-13 * scale[:, None, None, None]] = 0.0
    back = apply_flow_adjoint(g).reshape(n, c * d)
    resid = np.abs(weight - back).max(axis=1) if n else np.zeros(0)
    resid = resid + 8 * _EPS64 * (np.abs(weight).max(axis=1) + np.abs(g).reshape(n, -1).max(axis=1))
    return g.reshape(n, c * h * w), resid


class FlowNet:
    r"""The linear front of a network in image space (shared by a batch).

    ``z_0 = G diag(inv_scale) ν + const`` (``inv_scale`` per channel and image): the rows
    of every node of the linear front stacked; CROWN bounds end on them
    (:class:`Linear`).

    Parameters
    ----------
    first_image : ndarray
        ``G``, ``(n_0, C*H*W)``.
    shape : tuple
        ``(C, H, W)``.
    device : str or torch.device
        Where the bound propagation runs.
    """

    def __init__(self, first_image, shape, *, device="cpu"):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.G = torch.as_tensor(np.asarray(first_image), dtype=torch.float64, device=self.device)
        self.G_np = np.ascontiguousarray(self.G.detach().cpu().numpy())
        self.G_csr = None
        if self.G_np.size and np.count_nonzero(self.G_np) < 0.25 * self.G_np.size:
            import scipy.sparse as sp

            csr = sp.csr_matrix(self.G_np)
            self.G_csr = (csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data)
            self.G_sparse_t = csr.T.tocsr()
            self.G_boxes = row_boxes(*self.G_csr[:2], *self.shape[1:])
        self.G_lip = _grad_absmax_t(self.G, self.shape, per_channel=True)  # (n_0, C)
        # a convolution's front: :func:`window_geometry` of one window over all its
        # neurons, set by the caller that knows the front's shape (see ball_norm);
        # :func:`conv_template` of its nodes
        self.front_geo = None
        self.templates: dict = {}
        # float32 copy for the dense intermediate-bound norms (see _lam_g_lip)
        self.G_np32 = None
        self.G_absmax = None
        if self.G_csr is None and self.G_np.size and np.all(np.abs(self.G_np) < _F32_SAFE):
            self.G_np32 = np.ascontiguousarray(self.G_np, dtype=np.float32)
            self.G_absmax = np.abs(self.G_np).max(axis=1)


def margin_spec(labels, num_classes: int) -> np.ndarray:
    """``S (N, K-1, K)``: rows ``e_y - e_t`` for ``t != y`` (margins ``f_y - f_t``)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.size
    s = np.zeros((n, num_classes - 1, num_classes))
    others = np.array([[t for t in range(num_classes) if t != y] for y in labels]).reshape(
        n, num_classes - 1
    )
    s[np.arange(n)[:, None], np.arange(num_classes - 1)[None], labels[:, None]] = 1.0
    s[np.arange(n)[:, None], np.arange(num_classes - 1)[None], others] = -1.0
    return s


@dataclass
class Linear:
    """Linear lower bounds ``Λ z_0 + β`` of ``m`` quantities per image of a batch.

    Attributes
    ----------
    lam : Tensor
        ``(N, m, n_0)``.
    centre : Tensor
        ``(N, m)``: the value at ``δµ``.
    extra : Tensor
        ``(N, m)``: slope per unit ``ε`` of the residual ``E`` of the first layer.
    inv_scale : Tensor
        ``(N, C)``.
    """

    lam: torch.Tensor
    centre: torch.Tensor
    extra: torch.Tensor
    inv_scale: torch.Tensor

    def q(self, net: FlowNet) -> torch.Tensor:
        """Image-space coefficients ``(N, m, C*H*W)`` of the bounds (``Λ G / s``)."""
        n, m, n0 = self.lam.shape
        c = net.shape[0]
        if net.G_csr is not None and not self.lam.requires_grad and net.device.type == "cpu":
            # a sparse G (a convolution's rows): (Gᵀ Λᵀ)ᵀ costs its non-zeros only
            lam = self.lam.detach().reshape(n * m, n0).numpy()
            q = torch.as_tensor(np.asarray(net.G_sparse_t @ lam.T).T).reshape(n, m, c, -1)
        else:
            q = (self.lam @ net.G).reshape(n, m, c, -1)
        q = q * self.inv_scale[:, None, :, None]
        return q.reshape(n, m, -1)

    def rows(self, net: FlowNet):
        """``rows(kk, rr)``: the image-space rows ``(n, C*H*W)`` of the bounds ``(kk[s],
        rr[s])`` only (as :meth:`q`), for :meth:`~.engine.domains.W1Polytope.gain_rows`."""

        def rows(kk, rr):
            kk, rr = torch.as_tensor(kk), torch.as_tensor(rr)
            one = Linear(self.lam[kk, rr][:, None], None, None, self.inv_scale[kk])
            return one.q(net).reshape(kk.numel(), -1).cpu().numpy()

        return rows


def sparse_rows_norm(net: FlowNet, vals, cols, scale, rows) -> np.ndarray:
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` of rows given by entries ``vals (N, m, P)`` at the
    front rows ``cols`` (broadcast over ``N``, ``m``) where ``rows (N, m)``; ``G`` sparse."""
    indptr, indices, data = net.G_csr
    c, h, w = net.shape
    work = int(rows.sum()) * vals.shape[2] * max(indices.size // max(indptr.size - 1, 1), 1)
    args = (vals, cols, indptr, indices, data, net.G_boxes, net.G_np.shape[1], scale, rows, c, h, w)
    return _small_serial(_lam_g_lip_csr, work // 50, *args)


def sparse_rows(net: FlowNet, vals, cols, scale) -> tuple:
    """Rows ``(Λ_r G)/s_b`` given by their entries ``vals (N, m, P)`` at the front rows
    ``cols`` (both may broadcast over ``N``), as the tuple the polytope's sparse kernel
    reads (:func:`~.polytope.polytope_gain_sparse_rows`); ``G`` sparse."""
    indptr, indices, data = net.G_csr
    return (
        np.ascontiguousarray(vals, dtype=np.float64),
        np.ascontiguousarray(cols, dtype=np.int64),
        indptr,
        indices,
        data,
        net.G_boxes,
        np.ascontiguousarray(scale, dtype=np.float64),
    )


def front_rows(net: FlowNet, a: int, z: int, inv: torch.Tensor):
    """The rows ``[G[a:z]; -G[a:z]]`` scaled per image and channel by ``inv (B, C)``, for
    :meth:`~.engine.domains.W1Polytope.gain_rows`: a :func:`sparse_rows` tuple where ``G``
    is sparse (a convolution's rows), else ``rows(kk, rr)`` giving them dense."""
    n, c = z - a, inv.shape[1]
    if net.G_csr is not None and net.device.type == "cpu":
        vals = np.concatenate([np.ones(n), -np.ones(n)]).reshape(1, 2 * n, 1)
        cols = np.tile(np.arange(a, z, dtype=np.int64), 2).reshape(1, 2 * n, 1)
        return sparse_rows(net, vals, cols, inv.cpu().numpy())

    def rows(kk, rr):
        kk, rr = torch.as_tensor(kk), torch.as_tensor(rr)
        sign = torch.where(rr < n, 1.0, -1.0).to(net.G.dtype)
        out = net.G[a + rr % n].reshape(kk.numel(), c, -1) * (inv[kk] * sign[:, None])[..., None]
        return out.reshape(kk.numel(), -1).cpu().numpy()

    return rows


def ball_norm(net: FlowNet, lin: Linear, rows=None, *, float32: bool = False) -> torch.Tensor:
    """``‖ã‖_∞ = ‖Aᵀ q‖_∞ + extra`` per bound ``(N, m)`` (the dual norm of the L1 ball).

    ``rows`` (``(N, m)`` bool) restricts the work (other entries are 0) on the CPU path;
    ``float32``: the sums of dense rows may be float32, with a rigorous error term (an
    upper bound of the norm: for intermediate bounds; the margins keep float64).
    """
    if lin.lam.requires_grad or net.device.type != "cpu":
        return _grad_absmax_t(lin.q(net), net.shape) + lin.extra
    n, m, _ = lin.lam.shape
    lam = np.ascontiguousarray(lin.lam.detach().numpy())
    mask = np.ones((n, m), dtype=np.bool_) if rows is None else np.asarray(rows, dtype=np.bool_)
    c, h, w = net.shape
    scale = np.ascontiguousarray(lin.inv_scale.detach().cpu().numpy())
    if net.front_geo is not None:  # a convolution's front: its transposed convolution
        win = torch.zeros((n, m), dtype=torch.int64)
        lip = folded_rows_norm(net, net.front_geo, lin.lam.detach(), win, scale, mask)
    elif net.G_csr is not None:
        cols = np.arange(lam.shape[2], dtype=np.int64).reshape(1, 1, -1)
        lip = sparse_rows_norm(net, lam, cols, scale, mask)
    else:
        g32 = net.G_np32 if float32 else None
        lip = _lam_g_lip(lam, net.G_np, scale, mask, c, h, w, G32=g32, g_absmax=net.G_absmax)
    return torch.as_tensor(lip) + lin.extra


def conv_template(net: FlowNet, a: int, z: int, shape) -> tuple | None:
    """The front rows ``[a, z)`` of a node of shape ``(C1, H1, W1)`` as one kernel per
    channel shifted over the image (a convolution, after or before any per-channel
    scaling): ``(template (C1, C0·kh·kw) float64, (sy, sx), (oy, ox), (kh, kw))``, the
    row of neuron ``(c, y, x)`` being ``template[c]`` placed at ``(oy + sy·y, ox + sx·x)``
    and clipped to the image; None if the rows are not exactly that (checked on every
    row), or without a sparse ``G``."""
    key = (a, z, tuple(int(s) for s in shape))
    if key not in net.templates:  # checked once per front node, whoever asks
        net.templates[key] = _conv_template(net, a, z, *key[2])
    return net.templates[key]


def _conv_template(net: FlowNet, a: int, z: int, c1: int, h1: int, w1: int):
    c0, h, w = net.shape
    if net.G_csr is None or z - a != c1 * h1 * w1 or h1 < 3 or w1 < 3:
        return None
    boxes = net.G_boxes[a:z].reshape(c1, h1, w1, 4)
    yr, xr = h1 // 2, w1 // 2

    def union(y, x):
        b = boxes[:, y, x]
        live = b[:, 1] >= 0
        if not live.any():
            return None
        return b[live, 0].min(), b[live, 1].max(), b[live, 2].min(), b[live, 3].max()

    ref, down, right = union(yr, xr), union(yr + 1, xr), union(yr, xr + 1)
    if ref is None or down is None or right is None:
        return None
    y0, y1, x0, x1 = (int(v) for v in ref)
    sy, sx = int(down[0]) - y0, int(right[2]) - x0
    if sy < 1 or sx < 1:
        return None
    kh, kw = y1 - y0 + 1, x1 - x0 + 1
    oy, ox = y0 - sy * yr, x0 - sx * xr
    g = net.G_np[a:z].reshape(c1, h1, w1, c0, h, w)
    tmpl = g[:, yr, xr, :, y0 : y0 + kh, x0 : x0 + kw]  # (C1, C0, kh, kw)
    expect = np.zeros_like(g)
    for y in range(h1):
        ty = oy + sy * y
        i0, i1 = max(ty, 0), min(ty + kh, h)
        for x in range(w1):
            tx = ox + sx * x
            j0, j1 = max(tx, 0), min(tx + kw, w)
            if i0 < i1 and j0 < j1:
                expect[:, y, x, :, i0:i1, j0:j1] = tmpl[:, :, i0 - ty : i1 - ty, j0 - tx : j1 - tx]
    if not np.array_equal(expect, g):
        return None
    return np.ascontiguousarray(tmpl.reshape(c1, -1)), (sy, sx), (oy, ox), (kh, kw)


def window_geometry(template: tuple, starts, step, window) -> dict:
    """What :func:`folded_rows_norm` needs of windows of a convolution reading the node
    of :func:`conv_template` ``template``: the windows start at its neurons ``starts (W,
    2)`` and take ``window = (kh2, kw2)`` of them ``step = (dy, dx)`` apart; the first
    kernel of window ``w`` sits at image pixel ``(top[w], left[w])``."""
    _, (sy, sx), (oy, ox), (kh, kw) = template
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 2)
    return {
        "template": template[0],
        "top": np.ascontiguousarray(oy + sy * starts[:, 0]),
        "left": np.ascontiguousarray(ox + sx * starts[:, 1]),
        "window": (int(window[0]), int(window[1])),
        "stride": (sy * int(step[0]), sx * int(step[1])),
        "kernel": (kh, kw),
    }


def folded_rows_norm(net: FlowNet, geo: dict, vals: torch.Tensor, win, scale, rows):
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` (as :func:`sparse_rows_norm`) of rows given by
    their entries ``vals (N, m, C1·kh2·kw2)`` on the windows ``win (N, m)`` of
    :func:`window_geometry`, where ``rows (N, m)`` (0 elsewhere).

    On a convolutional front each entry's row of ``G`` is its channel's kernel shifted,
    so ``Λ_r G`` is the window's transposed convolution (:func:`~.ball._folded_lip`: the
    channels' kernels combined per window position, then placed), in float64."""
    out = torch.zeros(rows.shape, dtype=torch.float64)
    bi, ri = torch.as_tensor(rows).nonzero(as_tuple=True)
    if bi.numel() == 0:
        return out
    tmpl = geo["template"]
    lam = vals[bi, ri].to(torch.float64).reshape(bi.numel(), tmpl.shape[0], -1)
    scale = torch.as_tensor(scale, dtype=torch.float64)[bi]
    args = (
        np.ascontiguousarray(lam.numpy()),
        tmpl,
        np.ascontiguousarray(torch.as_tensor(win)[bi, ri].numpy()),
        np.ascontiguousarray(scale.numpy()),
        geo["top"],
        geo["left"],
        *geo["window"],
        *geo["stride"],
        *geo["kernel"],
        *net.shape,
    )
    out[bi, ri] = torch.as_tensor(_small_serial(_folded_lip, lam.numel() * 4, *args))
    return out
