"""Exact W1 (L1 ground cost) on a pixel grid as a min-cost flow on the 4-neighbour graph.

By Theorem 1 (Ling & Okada 2007), the Earth Mover's Distance with L1 ground distance
between two histograms ``x`` and ``y`` of equal mass on an ``H x W`` grid equals

.. math::

    W_1(x, y) = \\min_{\\delta} \\|\\delta\\|_1
    \\quad \\text{s.t.} \\quad x + A\\,\\delta = y ,

where :math:`\\delta \\in \\mathbb{R}^D`, :math:`D = H(W-1) + (H-1)W`, holds one signed flow per
edge of the 4-neighbour grid graph and :math:`A \\in \\{-1, 0, 1\\}^{HW \\times D}` is the
node-edge incidence matrix (:func:`flowverify.transport.grid.incidence_matrix`).  Flows are
laid out as ``concat(h.ravel(), v.ravel())``, with ``h`` of shape ``(H, W-1)`` (``h[i, j]``
moves mass from pixel ``(i, j)`` to ``(i, j+1)``) and ``v`` of shape ``(H-1, W)``
(``v[i, j]`` moves mass from ``(i, j)`` to ``(i+1, j)``); a negative value moves mass the
other way, and ``A @ delta`` is :func:`flowverify.transport.grid.divergence`.

This module is the batch driver and the public entry points
(:func:`grid_min_cost_flow`, :func:`grid_w1`): it builds the grid graph's tables (edge
endpoints in the column order of ``A``, neighbour lists), orients every problem, runs the
compiled primal network simplex of :mod:`flowverify.transport.simplex_kernels` on it and
spreads a batch over threads (the compiled solver releases the GIL).

References
----------
H. Ling and K. Okada, "An Efficient Earth Mover's Distance Algorithm for Robust Histogram
Comparison", IEEE TPAMI 29(5), 2007 (Theorem 1: EMD-L1 as a min-cost flow on the grid graph).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from flowverify.transport.simplex_kernels import (
    bfs01_tree,
    extract_flow,
    init_basis,
    jit_kernel,
    run_simplex,
)

__all__ = ["grid_min_cost_flow", "grid_w1"]


# ----------------------------------------------------------------------------------------------
# grid tables and the batch driver
# ----------------------------------------------------------------------------------------------


@jit_kernel()
def _unpack_tables(tab, n, D):
    """Views ``ea, eb`` (edge endpoints, ``ea < eb``), ``hm, vm`` (1 where a pixel has a right /
    down edge), ``hidx`` (id of the right edge), ``nbr, nbe`` (neighbours of pixel ``u`` and the
    edges to them at ``4u .. 4u+3``: right, left, down, up; ``-1``: none)."""
    ea = tab[:D]
    eb = tab[D : 2 * D]
    o = 2 * D
    hm = tab[o : o + n]
    vm = tab[o + n : o + 2 * n]
    hidx = tab[o + 2 * n : o + 3 * n]
    nbr = tab[o + 3 * n : o + 7 * n]
    nbe = tab[o + 7 * n : o + 11 * n]
    return ea, eb, hm, vm, hidx, nbr, nbe


@jit_kernel()
def _grid_tables(H, W):
    """Grid tables, packed in one int32 array (see :func:`_unpack_tables`).

    Edge ``e`` runs from ``ea[e]`` to ``eb[e]``: the -1 and +1 rows of column ``e`` of
    :func:`flowverify.transport.grid.incidence_matrix`, which this mirrors (compared in
    ``tests/test_grid.py``).
    """
    n = H * W
    nh = H * (W - 1)
    D = nh + (H - 1) * W
    tab = np.zeros(2 * D + 11 * n, np.int32)
    ea, eb, hm, vm, hidx, nbr, nbe = _unpack_tables(tab, n, D)
    nbr[:] = -1
    nbe[:] = -1
    for i in range(H):
        for j in range(W):
            q = i * W + j
            if j < W - 1:
                e = i * (W - 1) + j
                ea[e] = q
                eb[e] = q + 1
                hm[q] = 1
                hidx[q] = e
                nbr[4 * q] = q + 1
                nbe[4 * q] = e
                nbr[4 * q + 5] = q
                nbe[4 * q + 5] = e
            if i < H - 1:
                ea[nh + q] = q
                eb[nh + q] = q + W
                vm[q] = 1
                nbr[4 * q + 2] = q + W
                nbe[4 * q + 2] = nh + q
                nbr[4 * (q + W) + 3] = q
                nbe[4 * (q + W) + 3] = nh + q
    return tab


@jit_kernel(nogil=True)
def _solve_range(sup, H, W, lo, hi, flows, costs, status, want_flow, block, tab):
    """Solve problems ``lo..hi-1`` of ``sup`` (shape ``(B, H*W)``) with one workspace;
    ``tab = _grid_tables(H, W)``.  ``status[b]`` receives the pivot count (``-1``: iteration
    limit, ``-2``: non-finite input); return 0 if all went well, else 1 or 2 (the worst)."""
    n = H * W
    nh = H * (W - 1)
    D = nh + (H - 1) * W
    ea, eb, hm, vm, hidx, nbr, nbe = _unpack_tables(tab, n, D)
    parent = np.empty(n, np.int32)
    pred = np.empty(n, np.int32)
    pdir = np.empty(n, np.float64)  # +1: tree arc u -> parent (up), -1: parent -> u
    nf = np.empty(n, np.float64)  # flow on the tree arc of u
    thread = np.empty(n, np.int32)
    rthread = np.empty(n, np.int32)
    succ = np.empty(n, np.int32)
    lsucc = np.empty(n, np.int32)
    pi = np.zeros(n + W + 1, np.int32)
    buf1 = np.empty(n, np.int32)
    buf2 = np.empty(n, np.int32)
    dirty = np.empty(n + 1, np.int32)
    tmp1 = np.empty(n, np.int32)
    tmp2 = np.empty(n, np.int32)
    dist = np.empty(n, np.int32)
    done = np.empty(n, np.bool_)
    dq = np.empty(8 * n + 8, np.int32)
    S = np.empty(n, np.float64)
    max_iter = 200 * (n + D) + 10000
    s = np.empty(n, np.float64)
    worst = 0
    for b in range(lo, hi):
        # Orient the problem so that the seeds of the initial tree (the pixels with s > 0,
        # towards which the flow goes) are the smaller of the two sets of pixels with non-zero
        # supply: solve for -sup[b] if it has fewer negative than positive entries.
        npos = 0
        nneg = 0
        finite = True
        for u in range(n):
            x = sup[b, u]
            if x > 0.0:
                npos += 1
            elif x < 0.0:
                nneg += 1
            finite &= abs(x) < np.inf  # False for inf and nan
        if not finite:
            status[b] = -2
            costs[b] = np.nan
            worst = 2
            continue
        sign = -1.0 if nneg < npos else 1.0
        for u in range(n):
            s[u] = sign * sup[b, u]
        root = bfs01_tree(s, n, nbr, nbe, parent, pred, dist, done, dq)
        init_basis(
            s, n, root, parent, pred, pdir, thread, rthread, succ, lsucc, pi, nf, S, tmp1, tmp2
        )
        it = run_simplex(
            n, W, nh, ea, eb, hm, vm, hidx, block, root, parent, pred, pdir, thread, rthread,
            succ, lsucc, pi, nf, buf1, buf2, dirty, max_iter,
        )  # fmt: skip
        status[b] = it
        if it < 0:
            worst = max(worst, 1)
        if want_flow:
            fl = flows[b]
            for e in range(D):
                fl[e] = 0.0
            costs[b] = extract_flow(s, n, root, eb, parent, pred, rthread, S, fl, True, sign)
        else:
            costs[b] = extract_flow(s, n, root, eb, parent, pred, rthread, S, flows[0], False, sign)
    return worst


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

_BLOCK = 48  # pricing block, in pixels (up to 96 edges)
_MIN_PER_THREAD = 4  # smallest batch share worth a thread


@functools.lru_cache(maxsize=8)
def _tables(H, W):
    return _grid_tables(H, W)


def _run(supply, want_flow):
    sup = np.asarray(supply, dtype=np.float64)
    if sup.ndim != 3:
        raise ValueError(f"supply must have shape (B, H, W), got {sup.shape}")
    B, H, W = sup.shape
    if H < 1 or W < 1:
        raise ValueError(f"empty grid {H}x{W}")
    D = H * (W - 1) + (H - 1) * W
    sup2 = np.ascontiguousarray(sup.reshape(B, H * W))
    flows = np.zeros((B, D) if want_flow else (1, D), np.float64)
    costs = np.zeros(B, np.float64)
    status = np.zeros(B, np.int64)
    if B == 0:
        return flows, costs
    nthreads = min(numba.get_num_threads(), B // _MIN_PER_THREAD)
    tab = _tables(H, W)
    if nthreads <= 1:
        worst = _solve_range(sup2, H, W, 0, B, flows, costs, status, want_flow, _BLOCK, tab)
    else:
        # The compiled solver releases the GIL: contiguous chunks (a few per thread, for load
        # balance) are solved by a pool of `nthreads` Python threads.
        nchunks = min(B // _MIN_PER_THREAD, 4 * nthreads)
        bounds = [(c * B) // nchunks for c in range(nchunks + 1)]

        def work(c):
            lo, hi = bounds[c], bounds[c + 1]
            return _solve_range(sup2, H, W, lo, hi, flows, costs, status, want_flow, _BLOCK, tab)

        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            worst = max(pool.map(work, range(nchunks)))
    if worst == 2:
        raise ValueError("supply contains non-finite values")
    if worst == 1:  # pragma: no cover - cycling safeguard, never observed
        raise RuntimeError("network simplex did not converge (iteration limit reached)")
    return flows, costs


def grid_min_cost_flow(supply: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimal L1 flows on the 4-neighbour grid graph, i.e. exact W1 with L1 ground cost.

    For every slice ``s = supply[b]`` (for a source ``x`` and a target ``y``: ``s = y - x``)
    solve the uncapacitated transshipment problem

    .. math::

        \\min_{\\delta \\in \\mathbb{R}^D} \\|\\delta\\|_1
        \\quad \\text{s.t.} \\quad A\\,\\delta = s ,

    whose optimal value is :math:`W_1(x, y)` with ground cost
    :math:`|i_p - i_q| + |j_p - j_q|` (Ling & Okada 2007, Theorem 1).

    Parameters
    ----------
    supply : numpy.ndarray
        Array of shape ``(B, H, W)`` (cast to float64).  Each slice must sum to zero up to
        rounding; a residual imbalance ``sum(s)`` is absorbed at one pixel (the root of the
        spanning tree), i.e. ``A @ flows[b] - s`` is ``-sum(s)`` at that pixel and exactly the
        summation rounding error elsewhere.  The caller should balance ``s`` to about
        ``1e-12 * mass``.

    Returns
    -------
    flows : numpy.ndarray
        Float64 array of shape ``(B, D)``, ``D = H*(W-1) + (H-1)*W``, laid out as
        ``concat(h.ravel(), v.ravel())`` (see the module docstring); ``flows[b]`` is an
        optimal basic solution (supported on a spanning forest of the grid).
    costs : numpy.ndarray
        Float64 array of shape ``(B,)``, ``costs[b] == abs(flows[b]).sum()``, the optimal value.

    Raises
    ------
    ValueError
        If ``supply`` is not 3-D, has an empty grid or contains non-finite values.

    Notes
    -----
    Primal network simplex with strongly feasible trees, block-search pricing and a 0-1 BFS
    initial tree (see the module docstring).  The optimality test is exact: the potentials
    ``pi`` are integers, and the solver stops only when ``|pi[p] - pi[q]| <= 1`` on every grid
    edge with equality on the tree edges, oriented along their flow, i.e. when ``pi`` is a
    feasible dual solution (a 1-Lipschitz function on the grid) in complementary slackness with
    the tree flow.  Rounding enters only the flow values (sums of at most ``H*W`` supplies):
    against POT, ``|costs - W1|`` stayed below 3e-13 (mass 1) on 38,000 random grids up to
    19x19, and below 3e-14 on MNIST digits.

    Batches of ``B >= 8`` are split over ``numba.get_num_threads()`` Python threads (the
    compiled solver releases the GIL).  Typical cost on one core of the development machine,
    28x28 MNIST digit against the uniform image: about 0.19 ms of CPU time (some 235 pivots),
    about 70x less than POT's ``ot.emd`` on the full 784 x 784 cost matrix.
    """
    return _run(supply, True)


def grid_w1(supply: np.ndarray) -> np.ndarray:
    """Exact W1 (L1 ground cost) for each slice of ``supply``, without the flows.

    Parameters
    ----------
    supply : numpy.ndarray
        Array of shape ``(B, H, W)``, each slice summing to about zero; see
        :func:`grid_min_cost_flow`.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(B,)``:
        :math:`\\min \\{\\|\\delta\\|_1 : A\\,\\delta = s\\}` for every slice ``s``.

    Raises
    ------
    ValueError
        As :func:`grid_min_cost_flow`.
    """
    return _run(supply, False)[1]
