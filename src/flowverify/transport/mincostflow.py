"""Exact W1 (L1 ground cost) on a pixel grid as a min-cost flow on the 4-neighbour graph.

By Theorem 1 of Ling & Okada (2007), the Earth Mover's Distance with L1 ground distance
between two histograms ``x`` and ``y`` of equal mass on an ``H x W`` grid equals

.. math::

    W_1(x, y) = \\min_{\\delta} \\|\\delta\\|_1
    \\quad \\text{s.t.} \\quad x + A\\,\\delta = y ,

where :math:`\\delta \\in \\mathbb{R}^D`, :math:`D = H(W-1) + (H-1)W`, holds one signed flow per
edge of the 4-neighbour grid graph and :math:`A \\in \\{-1, 0, 1\\}^{HW \\times D}` is the
node-edge incidence matrix.  Flows are laid out as ``concat(h.ravel(), v.ravel())``, with
``h`` of shape ``(H, W-1)`` (``h[i, j]`` moves mass from pixel ``(i, j)`` to ``(i, j+1)``) and
``v`` of shape ``(H-1, W)`` (``v[i, j]`` moves mass from ``(i, j)`` to ``(i+1, j)``); a negative
value moves mass the other way.  Hence
``(A @ delta)[i, j] = h[i, j-1] + v[i-1, j] - h[i, j] - v[i, j]`` (terms outside the grid are 0).

The problem is an uncapacitated transshipment problem: every grid edge is replaced by two
arcs of cost 1 (one per direction) and the node demands are ``supply = y - x``.  We solve it
exactly with a primal network simplex (Dantzig; Ahuja, Magnanti & Orlin 1993, ch. 11) compiled
with numba:

* the spanning-tree basis is stored as in LEMON's ``NetworkSimplex`` (parent, predecessor arc,
  thread / reverse thread, subtree size and last successor), so a pivot costs time proportional
  to the cycle length and the size of the re-hung subtree;
* node potentials are integers (all arc costs are 1), so pricing is exact integer arithmetic: a
  non-tree edge ``(p, q)`` violates dual feasibility iff ``|pi[p] - pi[q]| >= 2``;
* pricing is a block search (as LEMON's ``BLOCK_SEARCH``) over blocks of pixels;
* degeneracy (exact zeros are common, e.g. MNIST backgrounds) is handled with Cunningham's
  strongly feasible trees: the initial tree points every zero-flow arc towards the root and the
  leaving arc is the last blocking arc met when walking the cycle from its apex, which rules out
  cycling;
* the initial basis is a 0-1 breadth-first-search tree grown from the smaller of the two sets of
  pixels with non-zero supply (moving between two of them is free), with the problem oriented
  (``s`` or ``-s``) so that the tree flow runs towards those pixels and the root: a cheap
  approximation of the optimal tree (about 0.3 pivots per pixel on MNIST);
* at the optimum, the flow is recomputed from the final tree (subtree sums of the supply), so it
  satisfies the flow-conservation constraints up to floating-point summation error.

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
from numba import njit

__all__ = ["grid_min_cost_flow", "grid_w1"]

# Node and edge ids are never negative where arrays are indexed: indexing with an unsigned
# value spares numba's negative-index wraparound test (some 20% of the solver's time).
_U = np.uint32


def _jit(**kwargs):
    """``numba.njit(cache=True, **kwargs)``, falling back to no caching when numba finds no
    writable cache directory (numba raises ``RuntimeError`` at decoration time then)."""

    def deco(func):
        try:
            return njit(cache=True, error_model="numpy", **kwargs)(func)
        except RuntimeError:  # pragma: no cover - depends on the file system
            return njit(cache=False, error_model="numpy", **kwargs)(func)

    return deco


# ----------------------------------------------------------------------------------------------
# initial basis
# ----------------------------------------------------------------------------------------------


@_jit()
def _bfs01_tree(s, n, nbr, nbe, parent, pred, dist, done, dq):
    """Spanning tree of the grid by 0-1 BFS; return its root.

    Seeds are the pixels with ``s > 0``; entering a seed costs 0, entering another pixel
    costs 1, so every pixel hangs below its nearest seed and connected groups of seeds form
    subtrees.  The root is the largest seed (pixel 0 if there is none).  ``parent[u]`` and
    ``pred[u]`` receive the parent pixel and the edge index; ``nbr[4u:4u+4]`` /
    ``nbe[4u:4u+4]`` list the neighbours of ``u`` and the edges to them (``-1``: none).
    """
    root = 0
    best = 0.0
    for u in range(n):
        if s[_U(u)] > best:
            best = s[_U(u)]
            root = u
        dist[_U(u)] = 1 << 30
        done[_U(u)] = False
    head = 4 * n + 4
    tail = head
    dq[_U(tail)] = root
    tail += 1
    dist[_U(root)] = 0
    parent[_U(root)] = -1
    pred[_U(root)] = -1
    while head < tail:
        u = dq[_U(head)]
        head += 1
        if done[_U(u)]:
            continue
        done[_U(u)] = True
        du = dist[_U(u)]
        for k in range(4 * u, 4 * u + 4):
            v = nbr[_U(k)]
            if v < 0 or done[_U(v)]:
                continue
            if s[_U(v)] > 0.0:
                if du < dist[_U(v)]:
                    dist[_U(v)] = du
                    parent[_U(v)] = u
                    pred[_U(v)] = nbe[_U(k)]
                    head -= 1
                    dq[_U(head)] = v
            elif du + 1 < dist[_U(v)]:
                dist[_U(v)] = du + 1
                parent[_U(v)] = u
                pred[_U(v)] = nbe[_U(k)]
                dq[_U(tail)] = v
                tail += 1
    return root


@_jit()
def _init_basis(
    s, n, root, parent, pred, pdir, thread, rthread, succ, lsucc, pi, nf, S, fchild, nsib
):
    """Thread (DFS preorder), subtree sizes / last successors, tree flows and potentials.

    The tree arc of ``u`` carries the net demand ``S[u]`` of the subtree of ``u``; it points
    down (parent -> u, ``pdir = -1``) if ``S[u] > 0`` and up (``pdir = +1``) otherwise, so
    zero-flow arcs point to the root (strongly feasible tree).  Potentials satisfy
    ``pi[head] = pi[tail] + 1`` on every tree arc.
    """
    # first-child / next-sibling lists
    for u in range(n):
        fchild[_U(u)] = -1
    for u in range(n - 1, -1, -1):
        p = parent[_U(u)]
        if p >= 0:
            nsib[_U(u)] = fchild[_U(p)]
            fchild[_U(p)] = u
    # iterative preorder walk: thread, reverse thread and last successors
    prev = root
    u = root
    while True:
        thread[_U(prev)] = u
        rthread[_U(u)] = prev
        prev = u
        if fchild[_U(u)] >= 0:
            u = fchild[_U(u)]
            continue
        leaf = u
        lsucc[_U(u)] = u
        while u != root and nsib[_U(u)] < 0:
            u = parent[_U(u)]
            lsucc[_U(u)] = leaf
        if u == root:
            break
        u = nsib[_U(u)]
    thread[_U(prev)] = root
    rthread[_U(root)] = prev
    # subtree sums and sizes in reverse preorder
    for u in range(n):
        S[_U(u)] = s[_U(u)]
        succ[_U(u)] = 1
    u = rthread[_U(root)]
    while u != root:
        p = parent[_U(u)]
        S[_U(p)] += S[_U(u)]
        succ[_U(p)] += succ[_U(u)]
        u = rthread[_U(u)]
    # flows, directions and potentials in preorder
    pi[_U(root)] = 0
    pdir[_U(root)] = 0.0
    nf[_U(root)] = 0.0
    u = thread[_U(root)]
    while u != root:
        d = S[_U(u)]
        if d > 0.0:
            pdir[_U(u)] = -1.0
            nf[_U(u)] = d
            pi[_U(u)] = pi[_U(parent[_U(u)])] + 1
        else:
            pdir[_U(u)] = 1.0
            nf[_U(u)] = -d
            pi[_U(u)] = pi[_U(parent[_U(u)])] - 1
        u = thread[_U(u)]


# ----------------------------------------------------------------------------------------------
# network simplex
# ----------------------------------------------------------------------------------------------


@_jit()
def _block_max(pi, hm, vm, p0, p1, W):
    """Largest ``|pi[q] - pi[q']|`` over the grid edges leaving pixels ``p0..p1-1`` rightwards
    or downwards (``hm`` / ``vm`` mask the edges that exist)."""
    a_ = pi[p0:p1]
    r_ = pi[p0 + 1 : p1 + 1]
    d_ = pi[p0 + W : p1 + W]
    h_ = hm[p0:p1]
    v_ = vm[p0:p1]
    mx = np.int32(0)
    for q in range(p1 - p0):
        a = a_[q]
        mx = max(mx, max(np.abs(a - r_[q]) * h_[q], np.abs(a - d_[q]) * v_[q]))
    return mx


@_jit()
def _block_argmax(pi, hm, vm, hidx, nh, p0, p1, W, mx):
    """First grid edge of the block ``p0..p1-1`` with ``|pi[q] - pi[q']| == mx``."""
    a_ = pi[p0:p1]
    r_ = pi[p0 + 1 : p1 + 1]
    d_ = pi[p0 + W : p1 + W]
    h_ = hm[p0:p1]
    v_ = vm[p0:p1]
    for q in range(p1 - p0):
        a = a_[q]
        if np.abs(a - r_[q]) * h_[q] == mx:
            return hidx[p0 + q]
        if np.abs(a - d_[q]) * v_[q] == mx:
            return nh + p0 + q
    return -1


@_jit()
def _simplex(
    n, W, nh, ea, eb, hm, vm, hidx, block, root, parent, pred, pdir, thread, rthread, succ,
    lsucc, pi, nf, buf1, buf2, dirty, max_iter,
):  # fmt: skip
    """Pivot until no grid edge violates ``|pi[p] - pi[q]| <= 1``; return the pivot count
    (``-1`` if ``max_iter`` pivots did not suffice)."""
    nblk = (n + block - 1) // block
    next_b = 0
    it = 0
    while True:
        # ---- pricing: block search over pixel blocks ------------------------------------
        in_e = -1
        bk = next_b
        for _ in range(nblk):
            p0 = bk * block
            p1 = min(p0 + block, n)
            bk += 1
            if bk == nblk:
                bk = 0
            mx = _block_max(pi, hm, vm, p0, p1, W)
            if mx > 1:
                # the most violated edge of the first block that has one
                in_e = _block_argmax(pi, hm, vm, hidx, nh, p0, p1, W, mx)
                break
        if in_e < 0:
            return it
        if it >= max_iter:
            return -1
        next_b = bk
        it += 1
        # entering arc first -> second goes uphill in potential
        a = ea[_U(in_e)]
        b = eb[_U(in_e)]
        if pi[_U(a)] < pi[_U(b)]:
            first = a
            second = b
        else:
            first = b
            second = a
        # ---- join node, recording both tree paths ---------------------------------------
        n1 = 0
        n2 = 0
        u = first
        v = second
        while u != v:
            if succ[_U(u)] < succ[_U(v)]:
                buf1[_U(n1)] = u
                n1 += 1
                u = parent[_U(u)]
            else:
                buf2[_U(n2)] = v
                n2 += 1
                v = parent[_U(v)]
        join = u
        # ---- leaving arc (strongly feasible rule: last blocking arc from the apex) -------
        delta = np.inf
        u_out = -1
        result = 0
        for k in range(n1):
            u = buf1[_U(k)]
            d = nf[_U(u)] if pdir[_U(u)] > 0.0 else np.inf
            if d < delta:
                delta = d
                u_out = u
                result = 1
        for k in range(n2):
            u = buf2[_U(k)]
            d = nf[_U(u)] if pdir[_U(u)] < 0.0 else np.inf
            if d <= delta:
                delta = d
                u_out = u
                result = 2
        if u_out < 0:  # pragma: no cover - impossible: a negative cycle has a backward arc
            return -1
        # ---- augment ---------------------------------------------------------------------
        if delta > 0.0:
            for k in range(n1):
                u = buf1[_U(k)]
                nf[_U(u)] -= pdir[_U(u)] * delta
            for k in range(n2):
                u = buf2[_U(k)]
                nf[_U(u)] += pdir[_U(u)] * delta
        if result == 1:
            u_in = first
            v_in = second
            in_dir = 1
        else:
            u_in = second
            v_in = first
            in_dir = -1
        # ---- update the tree (LEMON's updateTreeStructure) -------------------------------
        old_rev_thread = rthread[_U(u_out)]
        old_succ_num = succ[_U(u_out)]
        old_last_succ = lsucc[_U(u_out)]
        v_out = parent[_U(u_out)]
        if u_in == u_out:
            parent[_U(u_in)] = v_in
            pred[_U(u_in)] = in_e
            pdir[_U(u_in)] = in_dir
            nf[_U(u_in)] = delta
            if thread[_U(v_in)] != u_out:
                after = thread[_U(old_last_succ)]
                thread[_U(old_rev_thread)] = after
                rthread[_U(after)] = old_rev_thread
                after = thread[_U(v_in)]
                thread[_U(v_in)] = u_out
                rthread[_U(u_out)] = v_in
                thread[_U(old_last_succ)] = after
                rthread[_U(after)] = old_last_succ
        else:
            if old_rev_thread == v_in:
                thread_continue = thread[_U(old_last_succ)]
            else:
                thread_continue = thread[_U(v_in)]
            stem = u_in
            par_stem = v_in
            last = lsucc[_U(u_in)]
            after = thread[_U(last)]
            thread[_U(v_in)] = u_in
            nd = 0
            dirty[_U(nd)] = v_in
            nd += 1
            while stem != u_out:
                next_stem = parent[_U(stem)]
                thread[_U(last)] = next_stem
                dirty[_U(nd)] = last
                nd += 1
                before = rthread[_U(stem)]
                thread[_U(before)] = after
                rthread[_U(after)] = before
                parent[_U(stem)] = par_stem
                par_stem = stem
                stem = next_stem
                if lsucc[_U(stem)] == lsucc[_U(par_stem)]:
                    last = rthread[_U(par_stem)]
                else:
                    last = lsucc[_U(stem)]
                after = thread[_U(last)]
            parent[_U(u_out)] = par_stem
            thread[_U(last)] = thread_continue
            rthread[_U(thread_continue)] = last
            lsucc[_U(u_out)] = last
            if old_rev_thread != v_in:
                thread[_U(old_rev_thread)] = after
                rthread[_U(after)] = old_rev_thread
            for k in range(nd):
                u = dirty[_U(k)]
                rthread[_U(thread[_U(u)])] = u
            tmp_sc = 0
            tmp_ls = lsucc[_U(u_out)]
            u = u_out
            p = parent[_U(u)]
            while u != u_in:
                pred[_U(u)] = pred[_U(p)]
                pdir[_U(u)] = -pdir[_U(p)]
                nf[_U(u)] = nf[_U(p)]
                tmp_sc += succ[_U(u)] - succ[_U(p)]
                succ[_U(u)] = tmp_sc
                lsucc[_U(p)] = tmp_ls
                u = p
                p = parent[_U(u)]
            pred[_U(u_in)] = in_e
            pdir[_U(u_in)] = in_dir
            nf[_U(u_in)] = delta
            succ[_U(u_in)] = old_succ_num
        up_limit_out = join if lsucc[_U(join)] == v_in else -1
        last_succ_out = lsucc[_U(u_out)]
        u = v_in
        while u != -1 and lsucc[_U(u)] == v_in:
            lsucc[_U(u)] = last_succ_out
            u = parent[_U(u)]
        if join != old_rev_thread and v_in != old_rev_thread:
            u = v_out
            while u != up_limit_out and lsucc[_U(u)] == old_last_succ:
                lsucc[_U(u)] = old_rev_thread
                u = parent[_U(u)]
        elif last_succ_out != old_last_succ:
            u = v_out
            while u != up_limit_out and lsucc[_U(u)] == old_last_succ:
                lsucc[_U(u)] = last_succ_out
                u = parent[_U(u)]
        u = v_in
        while u != join:
            succ[_U(u)] += old_succ_num
            u = parent[_U(u)]
        u = v_out
        while u != join:
            succ[_U(u)] -= old_succ_num
            u = parent[_U(u)]
        # ---- potentials: shift the re-hung subtree, or (cheaper) its complement ----------
        sigma = pi[_U(v_in)] - pi[_U(u_in)] - in_dir
        end = thread[_U(lsucc[_U(u_in)])]
        if 2 * succ[_U(u_in)] <= n:
            u = u_in
            while u != end:
                pi[_U(u)] += sigma
                u = thread[_U(u)]
        else:
            u = end
            while u != u_in:
                pi[_U(u)] -= sigma
                u = thread[_U(u)]
            if abs(pi[_U(root)]) > 1 << 29:  # keep int32 potentials far from overflow
                shift = pi[_U(root)]
                for q in range(n):
                    pi[_U(q)] -= shift


@_jit()
def _extract(s, n, root, eb, parent, pred, rthread, S, flow, want_flow, sign):
    """Flow of the final tree from subtree sums of ``s`` (the root absorbs ``sum(s)``), times
    ``sign``, into ``flow``; return its L1 norm."""
    for u in range(n):
        S[_U(u)] = s[_U(u)]
    cost = 0.0
    u = rthread[_U(root)]
    while u != root:
        d = S[_U(u)]
        S[_U(parent[_U(u)])] += d
        if want_flow:
            e = pred[_U(u)]
            flow[_U(e)] = sign * d if eb[_U(e)] == u else -sign * d
        cost += abs(d)
        u = rthread[_U(u)]
    return cost


@_jit()
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


@_jit()
def _grid_tables(H, W):
    """Grid tables, packed in one int32 array (see :func:`_unpack_tables`)."""
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


@_jit(nogil=True)
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
        root = _bfs01_tree(s, n, nbr, nbe, parent, pred, dist, done, dq)
        _init_basis(
            s, n, root, parent, pred, pdir, thread, rthread, succ, lsucc, pi, nf, S, tmp1, tmp2
        )
        it = _simplex(
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
            costs[b] = _extract(s, n, root, eb, parent, pred, rthread, S, fl, True, sign)
        else:
            costs[b] = _extract(s, n, root, eb, parent, pred, rthread, S, flows[0], False, sign)
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
