"""The W1 ball's dual norm ``‖Aᵀq‖_∞`` (Theorem 3: ``min qᵀν = qᵀµ - ε‖Aᵀq‖_∞`` over
the ball) of the rows ``ΛG`` of many bounds at once, in float32 with a rigorous
rounding-error term (Higham's dot-product bound) or float64.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from flowverify.verification.numerics import _small_serial


@numba.njit(cache=True)
def _acc_lip(acc, scale, C, H, W, i0=0, i1=-1, j0=0, j1=-1):
    """``max_c scale_c · max |neighbour differences of acc in channel c|``, over the
    pixel pairs inside rows ``i0..i1`` and columns ``j0..j1`` (default: the image).

    The maxima are kept per column (``lanes``) and reduced at the end: the column loops
    then vectorise (a maximum is exact in any order)."""
    if i1 < 0:
        i1, j1 = H - 1, W - 1
    hw = H * W
    lanes = np.empty(W, dtype=acc.dtype)
    out = 0.0
    for c in range(C):
        base = c * hw
        lanes[:] = 0.0
        for i in range(i0, i1 + 1):
            p0 = base + i * W
            for j in range(j0, j1):
                d = abs(acc[p0 + j + 1] - acc[p0 + j])
                lanes[j] = d if d > lanes[j] else lanes[j]
        for i in range(i0, i1):
            p0 = base + i * W
            for j in range(j0, j1 + 1):
                d = abs(acc[p0 + W + j] - acc[p0 + j])
                lanes[j] = d if d > lanes[j] else lanes[j]
        m = 0.0
        for j in range(j0, j1 + 1):
            if lanes[j] > m:
                m = lanes[j]
        if m * scale[c] > out:
            out = m * scale[c]
    return out


#: Unit roundoff of float32.
_U32 = 2.0**-24
#: Above these magnitudes (coefficients, or their dot products with ``|G|``) the float32
#: kernel could overflow; the float64 one runs instead.
_F32_SAFE = 1e30


def _f32_dot_error(lam: np.ndarray, g_absmax: np.ndarray, scale: np.ndarray):
    """Twice the largest error of the float32 sums ``Σ_k fl(a_k)·fl(G_kp)``, times the scale.

    ``lam (..., n_0)`` the rows' coefficients, ``scale (..., C)`` (leading dimensions a
    prefix of the rows').

    Higham's bound for a dot product of length ``n`` whose ``2n`` inputs are rounded to
    float32 first: ``|error| <= γ_{n+2} Σ_k |a_k||G_kp| + (Σ_k |a_k| + Σ_k max|G_k| + n)
    · 2^-125`` (the last term covers subnormal inputs, products and sums even where a
    BLAS flushes them to 0: each is then off by at most ``2^-126`` times the other factor,
    or ``2^-126``), with ``γ_n = nu / (1 - nu)`` and ``Σ_k |a_k||G_kp| <= Σ_k |a_k|
    max_p |G_kp|``.  Returns ``(nb, m)`` or ``None`` when the magnitudes could overflow
    float32 (the caller then uses float64).
    """
    n0 = lam.shape[-1]
    absl = np.abs(lam)
    s = absl @ g_absmax
    if not (
        np.all(np.isfinite(s))
        and absl.max(initial=0.0) < _F32_SAFE
        and s.max(initial=0.0) < _F32_SAFE
    ):
        return None
    nu = (n0 + 2) * _U32
    gamma = nu / (1.0 - nu)
    tiny = (absl.sum(axis=-1) + g_absmax.sum() + n0) * 2.0**-125
    smax = scale.max(axis=-1).reshape(scale.shape[:-1] + (1,) * (s.ndim - scale.ndim + 1))
    return 2.0 * (gamma * s + tiny) * smax * (1.0 + 1e-6)


@numba.njit(cache=True, parallel=True)
def _rows_lip(acc, which, scale, C, H, W):
    """:func:`_acc_lip` of each row ``acc[t]`` (image-space, ``(N, C·H·W)``) with the
    channel scales ``scale[which[t]]``."""
    out = np.empty(acc.shape[0])
    for t in numba.prange(acc.shape[0]):
        out[t] = _acc_lip(acc[t], scale[which[t]], C, H, W)
    return out


#: Rows of ``ΛG`` formed at once by a matrix product, into one buffer per call (reused by
#: its chunks): a fresh output of megabytes per product cost page faults (measured 2x).
_BLAS_ROWS = 512


def _blas_rows_lip(lam, G_t, scale, rows, C, H, W, *, g_absmax=None):
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` for the rows with ``rows[b, r]`` (0 elsewhere):
    the sums ``Λ_r G`` a matrix product (BLAS) in the dtype of ``G_t``, in chunks of
    :data:`_BLAS_ROWS` rows, the neighbour differences :func:`_acc_lip`'s.  In float32
    (with ``g_absmax``) ``1 + 2u`` times that plus :func:`_f32_dot_error`'s term, or None
    where float32 could overflow."""
    nb, m, _ = lam.shape
    out = np.zeros((nb, m))
    bb, rr = np.nonzero(rows)
    f32 = G_t.dtype == torch.float32
    buf = torch.empty((min(bb.size, _BLAS_ROWS), G_t.shape[1]), dtype=G_t.dtype)
    for a in range(0, bb.size, _BLAS_ROWS):
        b, r = bb[a : a + _BLAS_ROWS], rr[a : a + _BLAS_ROWS]
        part = lam[b, r]
        err, grow = 0.0, 1.0
        if f32:
            err = _f32_dot_error(part, g_absmax, scale[b])
            if err is None:
                return None
            part, grow = part.astype(np.float32), 1.0 + 2.0 * _U32
        acc = torch.matmul(torch.from_numpy(part), G_t, out=buf[: b.size]).numpy()
        lip = _small_serial(_rows_lip, acc.size // 2, acc, b, scale, C, H, W)
        out[b, r] = lip * grow + err
    return out


def _lam_g_lip(lam, G, scale, rows, C, H, W, *, G32=None, g_absmax=None):
    """``‖Aᵀ(Λ_r G diag(scale_b))‖_∞`` per row ``(B, m)`` where ``rows``, 0 elsewhere.

    ``lam (B, m, n_0)`` and ``G (n_0, C·H·W)`` float64.  With ``G32`` (``G`` in float32)
    and ``g_absmax`` (``max_p |G_kp|``) the sums are float32 and the result a rigorous
    upper bound of the exact norm: ``1 + 2u`` times the computed norm plus the error term
    of :func:`_f32_dot_error` (each sum is off by at most half of it, a neighbour
    difference by all of it, and its float32 rounding by a factor ``1 + u``; ``u =
    2^-24``); the excess is at most about ``4 (n_0 + 2) u Σ_k |Λ_k| max|G_k|`` (2.4e-5 of
    that sum for 100 neurons).  Higham's bound holds whatever the order of the sums and
    with fused multiply-adds, so a BLAS forms them; in float32 only where torch's float32
    products are IEEE ones (``torch.get_float32_matmul_precision() == "highest"``, the
    default), else, as where float32 could overflow, in float64.
    """
    if G32 is not None and torch.get_float32_matmul_precision() == "highest":
        out = _blas_rows_lip(lam, torch.from_numpy(G32), scale, rows, C, H, W, g_absmax=g_absmax)
        if out is not None:
            return out
    return _blas_rows_lip(lam, torch.from_numpy(G), scale, rows, C, H, W)


@numba.njit(cache=True)
def _csr_row(vals, cols, b, r, indptr, indices, data, boxes, acc, C, H, W):
    """Row ``(b, r)`` of ``ΛG`` from its entries (``vals[b, r, e]`` at the row
    ``cols[b, r, e]`` of ``G`` in CSR form; ``vals`` and ``cols`` may broadcast over
    ``b`` and ``r``) into ``acc``, on the union of its entries' boxes (``boxes``:
    :func:`row_boxes`) grown by one pixel (the zeros around it) and clipped to the image;
    ``acc`` is zeroed there and not written elsewhere.  Returns that box ``(i0, i1, j0,
    j1)``, ``i1 < 0`` for an empty row."""
    vb = b if vals.shape[0] > 1 else 0
    vr = r if vals.shape[1] > 1 else 0
    cb = b if cols.shape[0] > 1 else 0
    cr = r if cols.shape[1] > 1 else 0
    i0, i1, j0, j1 = H, -1, W, -1
    for e in range(vals.shape[2]):
        if vals[vb, vr, e] != 0.0:
            k = cols[cb, cr, e]
            i0, i1 = min(i0, boxes[k, 0]), max(i1, boxes[k, 1])
            j0, j1 = min(j0, boxes[k, 2]), max(j1, boxes[k, 3])
    if i1 < 0:
        return i0, i1, j0, j1
    i0, i1 = max(i0 - 1, 0), min(i1 + 1, H - 1)
    j0, j1 = max(j0 - 1, 0), min(j1 + 1, W - 1)
    for c in range(C):
        for i in range(i0, i1 + 1):
            for j in range(j0, j1 + 1):
                acc[c * H * W + i * W + j] = 0.0
    for e in range(vals.shape[2]):
        a = vals[vb, vr, e]
        if a != 0.0:
            k = cols[cb, cr, e]
            for z in range(indptr[k], indptr[k + 1]):
                acc[indices[z]] += a * data[z]
    return i0, i1, j0, j1


@numba.njit(cache=True, parallel=True)
def _lam_g_lip_csr(vals, cols, indptr, indices, data, boxes, p_all, scale, rows, C, H, W):
    """:func:`_lam_g_lip` (float64) for a sparse ``G`` in CSR form (convolutions) and
    rows ``Λ_r`` given by their entries (:func:`_csr_row`; a dense ``Λ`` has
    ``cols = arange(n_0)``): a row of ``ΛG`` lives in the union of its entries' boxes,
    so its sum and its differences are taken there, grown by one pixel: the same norm,
    on the box only."""
    nb, m = rows.shape
    out = np.zeros((nb, m))
    for t in numba.prange(nb * m):
        b = t // m
        r = t % m
        if not rows[b, r]:
            continue
        acc = np.empty(p_all)
        i0, i1, j0, j1 = _csr_row(vals, cols, b, r, indptr, indices, data, boxes, acc, C, H, W)
        if i1 >= 0:
            out[b, r] = _acc_lip(acc, scale[b], C, H, W, i0, i1, j0, j1)
    return out


def row_boxes(indptr, indices, H: int, W: int) -> np.ndarray:
    """``(n, 4)`` int64: the first and last row and column of each CSR row's non-zeros
    (over every channel; ``[H, -1, W, -1]`` for an empty row)."""
    n = indptr.size - 1
    out = np.tile(np.array([H, -1, W, -1], dtype=np.int64), (n, 1))
    row = np.repeat(np.arange(n), np.diff(indptr))
    pix = indices % (H * W)
    i, j = pix // W, pix % W
    np.minimum.at(out[:, 0], row, i)
    np.maximum.at(out[:, 1], row, i)
    np.minimum.at(out[:, 2], row, j)
    np.maximum.at(out[:, 3], row, j)
    return out


def _grad_absmax_t(q: torch.Tensor, shape, *, per_channel: bool = False) -> torch.Tensor:
    """``‖Aᵀq‖_∞`` of image-space rows ``q (..., C*H*W)`` -> ``(...)`` or ``(..., C)``."""
    c, h, w = shape
    x = q.reshape(*q.shape[:-1], c, h, w)
    out = torch.zeros((*q.shape[:-1], c), dtype=q.dtype, device=q.device)
    if w > 1:
        out = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=(-2, -1))
    if h > 1:
        out = torch.maximum(out, (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=(-2, -1)))
    return out if per_channel else out.amax(dim=-1)


@numba.njit(cache=True, parallel=True)
def _folded_lip(lam, tmpl, win, scale, top, left, kh2, kw2, sy, sx, kh, kw, C, H, W):
    """``‖Aᵀ(Λ_r G diag(scale_r))‖_∞`` of rows on windows of a convolutional front:
    ``lam (R, C1, kh2·kw2)`` the entries of each row at its window's neurons, ``tmpl
    (C1, C·kh·kw)`` each channel's kernel (the front's row of a neuron, placed ``sy, sx``
    pixels apart from its neighbours'), ``win (R,)`` the windows, whose first kernel
    sits at image pixel ``(top[w], left[w])``, ``scale (R, C)``.

    Per window position the channels' kernels are combined (``C1·C·kh·kw``
    multiply-adds, contiguous), then added at the position's place in the image (the
    transposed convolution; pixels outside the image are the front's padding and are
    dropped), on the window's box grown by one pixel and clipped to the image; the
    norm there is :func:`_acc_lip`'s, as for the sparse rows (:func:`_lam_g_lip_csr`)."""
    n_rows, c1, n_pos = lam.shape
    nk = tmpl.shape[1]
    bh, bw = (kh2 - 1) * sy + kh, (kw2 - 1) * sx + kw
    hw = H * W
    out = np.zeros(n_rows)
    n_chunks = min(n_rows, 256)  # one image-sized accumulator per chunk of rows
    for chunk in numba.prange(n_chunks):
        acc = np.empty(C * hw)
        comb = np.empty(nk)
        for r in range(chunk, n_rows, n_chunks):
            y0, x0 = top[win[r]], left[win[r]]
            i0, i1 = max(y0 - 1, 0), min(y0 + bh, H - 1)
            j0, j1 = max(x0 - 1, 0), min(x0 + bw, W - 1)
            if i0 > i1 or j0 > j1:
                continue
            for ch in range(C):
                for i in range(i0, i1 + 1):
                    for j in range(j0, j1 + 1):
                        acc[ch * hw + i * W + j] = 0.0
            for pos in range(n_pos):
                comb[:] = 0.0
                live = False
                for c in range(c1):
                    v = lam[r, c, pos]
                    if v != 0.0:
                        live = True
                        for k in range(nk):
                            comb[k] += v * tmpl[c, k]
                if not live:
                    continue
                py = y0 + (pos // kw2) * sy
                px = x0 + (pos % kw2) * sx
                ia, ib = max(-py, 0), min(kh, H - py)  # the kernel's rows in the image
                ja, jb = max(-px, 0), min(kw, W - px)
                for ch in range(C):
                    for i in range(ia, ib):
                        base = ch * hw + (py + i) * W + px
                        kk = (ch * kh + i) * kw
                        for j in range(ja, jb):
                            acc[base + j] += comb[kk + j]
            out[r] = _acc_lip(acc, scale[r], C, H, W, i0, i1, j0, j1)
    return out
