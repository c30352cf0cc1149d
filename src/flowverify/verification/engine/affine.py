r"""Affine operators of the engine: forward, backward (transposed) and interval maps.

Bound propagation (CROWN) carries linear functions ``Λ x + β`` of a node's output back to
its input.  For an affine operator ``y = M x + d`` that is ``Λ M x + (Λ d + β)``, so each
operator here gives

* ``backward(lam)``: ``Λ M`` for ``lam (B, m, *out_shape)`` -> ``(B, m, *in_shape)``,
  computed in the operator's own form (a convolution's transpose is a transposed
  convolution, never a dense matrix);
* ``bias(lam)``: ``Λ d`` -> ``(B, m)``;
* ``interval(lo, up)``: an enclosure of ``{M x + d : lo <= x <= up}`` (interval
  arithmetic, used only to skip neurons that are stable anyway).

The model's first affine operations play the role of the paper's ``W`` in ``W̃ = WA``
(Corollary 2.1): the engine never fuses them with ``A``; the input domain receives the
image-space coefficients ``q = Λ M`` and applies ``A`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowverify.model.layers import Elementwise

__all__ = [
    "BatchNormOp",
    "ConstantOp",
    "ConvOp",
    "LinearOp",
    "Merge",
    "PositiveLinearOp",
    "ReshapeOp",
]


def _flat(lam: torch.Tensor, nd: int):
    """``(B, m, *S)`` -> ``(B*m, *S)`` (``nd`` = number of sample dims)."""
    return lam.reshape(-1, *lam.shape[lam.dim() - nd :])


def _split(x: torch.Tensor, b: int, m: int):
    return x.reshape(b, m, *x.shape[1:])


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


class _Affine:
    def to(self, device, dtype):
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device=device, dtype=dtype))

    def interval(self, lo, up):
        mid, rad = (lo + up) / 2, (up - lo) / 2
        c = self.forward(mid)
        r = self.forward_abs(rad)
        return c - r, c + r


class LinearOp(_Affine):
    """``y = x Wᵀ + b`` on the last dimension."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach()
        self.b = None if bias is None else bias.detach()

    def forward(self, x):
        return F.linear(x, self.weight, self.b)

    def forward_abs(self, x):
        return F.linear(x, self.weight.abs())

    def backward(self, lam):
        return lam @ self.weight

    def bias(self, lam):
        if self.b is None:
            return lam.new_zeros(lam.shape[:2])
        return _sum_rows(lam @ self.b[:, None])

    def unit_rows(self, sel: torch.Tensor, weight: torch.Tensor):
        """``Σ_r w_r e_{sel_r}`` carried back: ``(w_r W_{sel_r}, w_r b_{sel_r})``."""
        lam = self.weight.index_select(0, sel.reshape(-1)).reshape(*sel.shape, -1)
        lam = lam.mul_(weight[..., None]) if not weight.requires_grad else lam * weight[..., None]
        beta = weight * self.b[sel] if self.b is not None else torch.zeros_like(weight)
        return lam, beta


class ConvOp(_Affine):
    """``nn.Conv2d`` (any stride, padding, dilation, groups; zero padding)."""

    def __init__(self, conv: nn.Conv2d, in_shape, out_shape):
        self.weight = conv.weight.detach()
        self.b = None if conv.bias is None else conv.bias.detach()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def _conv(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, self.weight, self.b)

    def forward_abs(self, x):
        return self._conv(x, self.weight.abs())

    def backward(self, lam):
        b, m = lam.shape[:2]
        g = _flat(lam, 3)
        out = torch.nn.grad.conv2d_input(
            (g.shape[0], *self.in_shape),
            self.weight,
            g,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return _split(out, b, m)

    def bias(self, lam):
        if self.b is None:
            return lam.new_zeros(lam.shape[:2])
        return (lam.sum(dim=(-2, -1)) * self.b).sum(dim=-1)

    def unit_rows(self, sel: torch.Tensor, weight: torch.Tensor):
        """``Σ_r w_r e_{sel_r}`` carried back: rows ``w_r M_{sel_r}`` and ``w_r d_{sel_r}``.

        ``sel (B, K)`` flat output neurons, ``weight (B, K)``.  Each row is the neuron's
        kernel placed at its window (a scatter of ``C_in/groups · kh · kw`` entries
        instead of a transposed convolution of a one-hot map).  Returns
        ``(lam (B, K, *in_shape), beta (B, K))``.
        """
        b, k = sel.shape
        c_out, c_in_g, kh, kw = self.weight.shape
        c_in, h, w = self.in_shape
        _, out_h, out_w = self.out_shape
        ho_wo = out_h * out_w
        s = sel.reshape(-1)
        wt = weight.reshape(-1).to(self.weight.dtype)
        ch, pos = s // ho_wo, s % ho_wo
        oy, ox = pos // out_w, pos % out_w
        group = ch // (c_out // self.groups)
        chans = group[:, None] * c_in_g + torch.arange(c_in_g, device=s.device)[None]  # (R, Cg)
        out = torch.zeros((s.numel(), c_in, h, w), dtype=self.weight.dtype, device=s.device)
        rows = torch.arange(s.numel(), device=s.device)
        kern = self.weight[ch] * wt[:, None, None, None]  # (R, Cg, kh, kw)
        for di in range(kh):
            y = oy * self.stride[0] - self.padding[0] + di * self.dilation[0]
            for dj in range(kw):
                x = ox * self.stride[1] - self.padding[1] + dj * self.dilation[1]
                ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
                if not bool(ok.any()):
                    continue
                r = rows[ok]
                out[r[:, None], chans[ok], y[ok][:, None], x[ok][:, None]] = kern[ok, :, di, dj]
        beta = wt * self.b[ch] if self.b is not None else torch.zeros_like(wt)
        return out.reshape(b, k, c_in, h, w), beta.reshape(b, k)

    def patch_rows(self, sel: torch.Tensor, weight: torch.Tensor):
        """The rows of :meth:`unit_rows` as patches: ``(vals (B, K, P), cols (B, K, P),
        beta (B, K))``, ``vals`` the kernel entries (``P = C_in/groups · kh · kw``) at the
        flat input neurons ``cols`` of the neuron's window (an entry in the padding has
        value 0 at neuron 0)."""
        b, k = sel.shape
        ho_wo = self.out_shape[1] * self.out_shape[2]
        s = sel.reshape(-1)
        ch = s // ho_wo
        table, valid = self._patch_table(s.device)
        row = self.window_ids(s)
        cols, ok = table[row], valid[row]
        wt = weight.reshape(-1).to(self.weight.dtype)
        vals = self.weight[ch].reshape(s.numel(), -1) * wt[:, None] * ok
        beta = wt * self.b[ch] if self.b is not None else torch.zeros_like(wt)
        return vals.reshape(b, k, -1), cols.reshape(b, k, -1), beta.reshape(b, k)

    def window_ids(self, sel: torch.Tensor) -> torch.Tensor:
        """The window (row of the patch table) each output neuron ``sel`` reads: its
        group's window at its position."""
        c_out = self.weight.shape[0]
        ho_wo = self.out_shape[1] * self.out_shape[2]
        return (sel // ho_wo // (c_out // self.groups)) * ho_wo + sel % ho_wo

    def _patch_table(self, device):
        """Flat input indices ``(G·Ho·Wo, P)`` of each group's window at each output
        position, and which are inside the input (not padding); cached."""
        cached = getattr(self, "_table", None)
        if cached is None or cached[0].device != device:
            _, c_in_g, kh, kw = self.weight.shape
            c_in, h, w = self.in_shape
            _, out_h, out_w = self.out_shape
            ar = lambda n: torch.arange(n, device=device)  # noqa: E731
            oy, ox = ar(out_h)[:, None], ar(out_w)[None, :]
            y = oy[..., None] * self.stride[0] - self.padding[0] + ar(kh) * self.dilation[0]
            x = ox[..., None] * self.stride[1] - self.padding[1] + ar(kw) * self.dilation[1]
            y = y[:, :, :, None].expand(out_h, out_w, kh, kw)  # (Ho, Wo, kh, kw)
            x = x[:, :, None, :].expand(out_h, out_w, kh, kw)
            ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            pix = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).reshape(out_h * out_w, 1, kh * kw)
            chans = ar(self.groups)[:, None] * c_in_g + ar(c_in_g)[None]  # (G, Cg)
            cols = chans[:, None, :, None] * (h * w) + pix[None]  # (G, HoWo, Cg, kh*kw)
            valid = ok.reshape(1, out_h * out_w, 1, kh * kw).expand_as(cols)
            cols = torch.where(valid, cols, torch.zeros_like(cols))
            n = self.groups * out_h * out_w
            self._table = (cols.reshape(n, -1), valid.reshape(n, -1))
        return self._table


class BatchNormOp(_Affine):
    """BatchNorm in eval mode: ``y = a x + d`` per channel (dimension 1 of the input)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        if bn.training:
            raise ValueError("model: BatchNorm must be in eval mode to be certified")
        rv, rm = bn.running_var.detach(), bn.running_mean.detach()
        w = bn.weight.detach() if bn.weight is not None else torch.ones_like(rv)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(rm)
        self.a = w / torch.sqrt(rv + bn.eps)
        self.d = beta - rm * self.a

    def _bc(self, v, nd):
        return v.reshape(-1, *([1] * (nd - 1)))

    def forward(self, x):
        nd = x.dim() - 1
        return x * self._bc(self.a, nd) + self._bc(self.d, nd)

    def forward_abs(self, x):
        return x * self._bc(self.a.abs(), x.dim() - 1)

    def backward(self, lam):
        return lam * self._bc(self.a, lam.dim() - 2)

    def bias(self, lam):
        return _sum_rows(lam * self._bc(self.d, lam.dim() - 2))


class ReshapeOp(_Affine):
    """Flatten, view, reshape: the per-sample data is unchanged."""

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def forward_abs(self, x):
        return self.forward(x)

    def interval(self, lo, up):
        return self.forward(lo), self.forward(up)

    def backward(self, lam):
        return lam.reshape(*lam.shape[:2], *self.in_shape)

    def bias(self, lam):
        return lam.new_zeros(lam.shape[:2])


class ConstantOp(_Affine):
    """``x + c``, ``x - c``, ``c - x``, ``x * c``, ``x / c`` with a constant ``c``."""

    def __init__(self, op: str, value):
        self.op = op
        c = torch.as_tensor(value).detach()
        while c.dim() > 1 and c.shape[0] == 1:
            c = c[0]  # a leading batch dimension of 1
        self.module = Elementwise(op, c)

    @property
    def c(self) -> torch.Tensor:
        return self.module.value

    def to(self, device, dtype):
        self.module = self.module.to(device=device, dtype=dtype)

    def forward(self, x):
        return self.module(x)

    def _factor(self):
        """The linear part's factor: ``±1``, ``c`` or ``1/c``."""
        if self.op in ("add", "sub"):
            return 1.0
        if self.op == "rsub":
            return -1.0
        return self.c if self.op == "mul" else 1.0 / self.c

    def forward_abs(self, x):
        f = self._factor()
        return x * (abs(f) if isinstance(f, float) else f.abs())

    def backward(self, lam):
        return lam * self._factor()

    def bias(self, lam):
        if self.op in ("mul", "div"):
            return lam.new_zeros(lam.shape[:2])
        d = -self.c if self.op == "sub" else self.c
        return _sum_rows(lam * d)


class PositiveLinearOp(_Affine):
    """A linear map with non-negative coefficients given by a module (average pooling,
    zero padding); its transpose is the module's vector-Jacobian product."""

    def __init__(self, module: nn.Module, in_shape):
        self.module = module
        self.in_shape = tuple(in_shape)

    def to(self, device, dtype):
        self.module = self.module.to(device=device, dtype=dtype)

    def forward(self, x):
        return self.module(x)

    def forward_abs(self, x):
        return self.module(x)

    def backward(self, lam):
        b, m = lam.shape[:2]
        g = _flat(lam, lam.dim() - 2)
        with torch.enable_grad():
            x = torch.zeros((g.shape[0], *self.in_shape), dtype=g.dtype, device=g.device)
            x.requires_grad_(True)
            (out,) = torch.autograd.grad(self.module(x), x, g)
        return _split(out, b, m)

    def bias(self, lam):
        return lam.new_zeros(lam.shape[:2])


class Merge:
    """``y = x_1 + sign * x_2``: a residual addition (or subtraction) of two branches."""

    def __init__(self, sign: float):
        self.sign = float(sign)

    def forward(self, a, b):
        return a + self.sign * b

    def interval(self, lo_a, up_a, lo_b, up_b):
        if self.sign > 0:
            return lo_a + lo_b, up_a + up_b
        return lo_a - up_b, up_a - lo_b
