r"""Rows of a convolution's neurons as patches on the linear front (auto_LiRPA's
"patches" mode), for the CROWN bounds of :class:`~.crown.EngineProblem`.

The bound of a neuron ``o`` of a convolution ``z_i = w ∗ σ(z_f) + d`` reading an
element-wise activation ``σ`` of a node ``f`` of the linear front (conv -> ReLU -> conv,
the usual stem of a CNN) starts as ``±w_o`` on the ``P = C_in · kh · kw`` neurons of its
window; ``σ``'s relaxation keeps it there, and the front's rows ``G`` (image space,
sparse) give its value at the image and its W1-ball dual norm ``‖Aᵀ(Λ G)‖_∞`` (Theorem 3).
So each row costs ``P`` entries instead of a dense map of ``f``'s size: the same bound,
computed by the same relaxation (:func:`~.activations.apply`) and the same norm
(:func:`~..flownet.sparse_rows_norm`), as the dense path of
:meth:`~.crown.EngineProblem._crown_bounds`.  When ``f`` is a convolution of the image
(its rows one kernel per channel, shifted; :func:`~..flownet.conv_template`), the norm
is taken on the window's transposed convolution instead
(:func:`~..flownet.folded_rows_norm`: the kernels combined per window position, then
placed), the same value for a fifth of the scattered additions.
"""

from __future__ import annotations

import numpy as np
import torch

from flowverify.verification import flownet as _flownet
from flowverify.verification.engine import activations as act
from flowverify.verification.engine.affine import ConvOp

__all__ = ["patch_bounds", "patch_front"]


def patch_front(prob, i: int):
    """``(activation, front node)`` when the rows of node ``i`` can stay patches down
    to the linear front (:func:`patch_bounds`): a convolution reading an element-wise
    activation of a front node, over a W1 domain whose front rows are sparse, on the
    CPU; else None."""
    node = prob.graph.nodes[i]
    if not isinstance(node.op, ConvOp) or not prob.domain.w1 or prob.device.type != "cpu":
        return None
    j = node.inputs[0]
    op = prob.graph.nodes[j].op
    if not isinstance(op, act.Activation) or isinstance(op, act.MaxPoolOp):
        return None
    f = prob.graph.nodes[j].inputs[0]
    if f not in prob.front or prob._front().G_csr is None:
        return None
    return j, f


def _folded(prob, i: int, f: int):
    """:func:`~..flownet.window_geometry` of convolution ``i``'s windows when the front
    node ``f`` it reads (through an activation) is a convolution of the image
    (:func:`~..flownet.conv_template`) and ``i`` has one group; else None.  Cached on
    the graph."""
    key = ("folded", i, f, tuple(prob._ends), str(prob.device))
    if key not in prob.graph.cache:
        op, shape = prob.graph.nodes[i].op, prob.graph.nodes[f].shape
        geo = None
        if op.groups == 1 and isinstance(op.padding, tuple) and len(shape) == 3:
            a, z = prob._offsets[f]
            tmpl = _flownet.conv_template(prob._front(), a, z, shape)
            if tmpl is not None:
                _, out_h, out_w = op.out_shape
                oy, ox = np.divmod(np.arange(out_h * out_w), out_w)
                starts = np.stack(
                    [oy * op.stride[0] - op.padding[0], ox * op.stride[1] - op.padding[1]], 1
                )
                geo = _flownet.window_geometry(tmpl, starts, op.dilation, op.weight.shape[2:])
        prob.graph.cache[key] = geo
    return prob.graph.cache[key]


def patch_bounds(prob, idx, eps, i: int, front, selected, lo, up, relax):
    """CROWN bounds of the selected neurons ``sel`` of a convolution ``i`` whose rows
    stay on their windows down to the front (auto_LiRPA's "patches"): the kernel
    entries (:meth:`~.affine.ConvOp.patch_rows`), the activation's relaxation at
    the window's neurons (:func:`~.activations.apply` with ``cols``), the centre from
    the front's values there and the ball's dual norm from the front's sparse rows
    (:func:`~..flownet.sparse_rows_norm`).  The same bound as the dense path, in
    ``P = C_in · kh · kw`` entries per row instead of the front's size."""
    j, f = front
    sel, valid = selected
    b = lo.shape[0]
    k = sel.shape[1]
    vals, cols, beta = prob.graph.nodes[i].op.patch_rows(sel, valid.to(lo.dtype))
    # the lower rows +w, the upper rows -w, on the same neurons
    vals, beta = act.apply(
        torch.cat([vals, -vals], 1), torch.cat([beta, -beta], 1), relax[j], cols=cols
    )
    cols = cols + prob._offsets[f][0]  # rows of the front map
    at = prob._front_vals[idx].gather(1, cols.reshape(b, -1)).reshape(cols.shape)
    centre = torch.cat([(vals[:, :k] * at).sum(2), (vals[:, k:] * at).sum(2)], 1) + beta
    net = prob._front()
    inv = prob.inv_scale[idx]
    mask = torch.cat([valid, valid], dim=1)
    geo = _folded(prob, i, f)
    rows = None  # the rows on the front's sparse map: for the polytope, or the norm
    if prob.domain.refines or geo is None:
        vals_np = np.ascontiguousarray(vals.numpy())
        cols_np = np.ascontiguousarray(torch.cat([cols, cols], 1).numpy())
        inv_np = np.ascontiguousarray(inv.numpy())
        rows = _flownet.sparse_rows(net, vals_np, cols_np, inv_np)
    if geo is not None:
        win = prob.graph.nodes[i].op.window_ids(sel)
        norm = _flownet.folded_rows_norm(net, geo, vals, torch.cat([win, win], 1), inv, mask)
    else:
        norm = _flownet.sparse_rows_norm(net, vals_np, cols_np, inv_np, mask.numpy())

    lo_f, up_f = lo.reshape(b, -1), up.reshape(b, -1)
    new_lo, new_up = prob._tighten(
        idx,
        eps,
        centre,
        torch.as_tensor(norm),
        rows,
        torch.gather(lo_f, 1, sel),
        torch.gather(up_f, 1, sel),
        valid,
        prob._piecewise(i),
        key=i,
        sel=sel,
    )
    lo_f = lo_f.scatter(1, sel, new_lo)
    up_f = up_f.scatter(1, sel, new_up)
    return lo_f.reshape(lo.shape), up_f.reshape(up.shape)
