r"""The compiled primal network simplex behind the exact grid min-cost flow.

Kernels (numba, ``cache=True``) of :mod:`flowverify.transport.mincostflow`, which solves

.. math::

    \min_{\delta} \|\delta\|_1 \quad \text{s.t.} \quad A\,\delta = s ,

the uncapacitated transshipment problem on the 4-neighbour grid graph whose optimal value
is :math:`W_1` with L1 ground cost between the two images with difference ``s``
(Theorem 1).  Every grid edge stands for two arcs of cost 1, one per direction.  The
kernels implement a primal network simplex (Dantzig; Ahuja, Magnanti & Orlin 1993,
ch. 11):

* the spanning-tree basis is stored as in LEMON's ``NetworkSimplex`` (parent, predecessor arc,
  thread / reverse thread, subtree size and last successor), so a pivot costs time proportional
  to the cycle length and the size of the re-hung subtree;
* node potentials are integers (all arc costs are 1), so pricing is exact integer arithmetic: a
  non-tree edge ``(p, q)`` violates dual feasibility iff ``|pi[p] - pi[q]| >= 2``, i.e. iff
  the reduced cost ``|(Aᵀ pi)_e|`` (:func:`flowverify.transport.grid.adjoint`) exceeds 1;
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

The grid graph itself (edge endpoints, neighbour lists) is built by
:mod:`flowverify.transport.mincostflow` in the edge order of
:func:`flowverify.transport.grid.incidence_matrix`.

References
----------
R. K. Ahuja, T. L. Magnanti and J. B. Orlin, *Network Flows*, Prentice Hall, 1993, ch. 11.
W. H. Cunningham, "A network simplex method", Mathematical Programming 11, 1976 (strongly
feasible trees).  The tree update of :func:`run_simplex` follows LEMON's ``NetworkSimplex``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bfs01_tree", "extract_flow", "init_basis", "jit_kernel", "run_simplex"]

# Node and edge ids are never negative where arrays are indexed: indexing with an unsigned
# value spares numba's negative-index wraparound test (some 20% of the solver's time).
_U = np.uint32


def jit_kernel(**kwargs):
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


@jit_kernel()
def bfs01_tree(s, n, nbr, nbe, parent, pred, dist, done, dq):
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


@jit_kernel()
def init_basis(
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


@jit_kernel()
def _block_max(pi, hm, vm, p0, p1, W):
    """Largest ``|pi[q] - pi[q']|`` over the grid edges leaving pixels ``p0..p1-1`` rightwards
    or downwards (``hm`` / ``vm`` mask the edges that exist).

    Inlines the reduced costs ``|(Aᵀ pi)_e|``: mirrors
    :func:`flowverify.transport.grid.adjoint` (compared in ``tests/test_grid.py``).
    """
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


@jit_kernel()
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


@jit_kernel()
def run_simplex(
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


@jit_kernel()
def extract_flow(s, n, root, eb, parent, pred, rthread, S, flow, want_flow, sign):
    """Flow of the final tree from subtree sums of ``s`` (the root absorbs ``sum(s)``), times
    ``sign``, into ``flow``; return its L1 norm.

    Edge ``e`` points from ``ea[e]`` to ``eb[e]``, the -1 and +1 rows of column ``e`` of
    :func:`flowverify.transport.grid.incidence_matrix`, so ``A @ flow = sign * s`` off the root.
    """
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
