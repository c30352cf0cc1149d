r"""The LP relaxation of the minimum-distance problem, with sound dual bounds.

For one target class ``t`` the LP is, with ``g = p - q`` (``p, q ≥ 0``) and the image
``ν = x_0 + A g`` (SPEC section 4, Theorem 6)

.. math::

    \min\ \mathbf 1^\top (p + q)\quad\text{s.t.}\quad
    \nu = x_0 + A(p - q),\ \nu \ge 0\ (\text{feasibility}),\
    \mathbf 1^\top(p + q) \le U,\ 0 \le p, q \le U,

    z_1 = V\nu + E(p - q) + b_1',\quad z_{k+1} = W_{k+1} a_k + b_{k+1},

    a_k \ge z_k,\ a_k \ge 0,\ a_k \le s_k (z_k - l_k)\ \text{(unstable)},\
    a_k = z_k\ \text{(active)},\ a_k = 0\ \text{(inactive)},\
    (W_L)_t a_{L-1} + b_{L,t} - (W_L)_y a_{L-1} - b_{L,y} \ge \kappa .

``W_1 = V A + E`` (``V`` the pixel potentials of the fused first layer, ``E`` a residual
that is zero up to rounding), so the dense first layer acts on the 784 pixels rather than
the 1512 flow coordinates ("image" form, about 3x faster); the "flow" form
(``z_1 = W_1(p - q) + c_1``) is used without feasibility or when ``E`` is not negligible.
For a linear chain (Lemma 8) the margin row acts on ``z_1`` directly.

Soundness: :meth:`RelaxationLP.safe_bound` turns any row-dual vector ``y`` into a valid
lower bound (all columns are boxed, Neumaier-Shcherbina):
``cᵀx ≥ Σ_i min(y_i r^l_i, y_i r^u_i) + Σ_j min(r_j x^l_j, r_j x^u_j)``,
``r = c - Mᵀy``, minus a rounding margin; a dual ray certifies infeasibility the same way.
Solver tolerances therefore never inflate a lower bound.
"""

from __future__ import annotations

import logging

import highspy
import numpy as np
import scipy.sparse as sp

from flowverify.verification import numerics as _numerics
from flowverify.verification._highs import new_highs, set_time_limit

__all__ = ["Problem", "RelaxationLP"]

logger = logging.getLogger(__name__)

INF = highspy.kHighsInf
_OPTIMAL = highspy.HighsModelStatus.kOptimal
_INFEASIBLE = highspy.HighsModelStatus.kInfeasible


class Problem:
    """Data shared by all LPs of one image.

    Attributes
    ----------
    weights, biases : list of ndarray
        The chain (float64).
    delta_mu : ndarray (n0,)
    x0 : ndarray (C*H*W,)
        The image ``R + Aδµ``.
    amat : scipy.sparse.csr_matrix (C*H*W, n0)
        Block-diagonal incidence matrix.
    label : int
    feasible : bool
    """

    def __init__(
        self,
        weights,
        biases,
        delta_mu,
        reference,
        label,
        *,
        height,
        width,
        channels,
        feasible,
        amat,
    ):
        self.weights = weights
        self.biases = biases
        self.delta_mu = delta_mu
        self.reference = reference
        self.label = int(label)
        self.height, self.width, self.channels = height, width, channels
        self.feasible = bool(feasible)
        self.amat = amat
        self.x0 = reference + amat @ delta_mu
        self.n0 = delta_mu.size
        self.npix = self.x0.size
        self.c1 = weights[0] @ delta_mu + biases[0]
        self.hidden = [w.shape[0] for w in weights[:-1]]
        self.num_classes = weights[-1].shape[0]
        self.channel_mass = self.x0.reshape(channels, -1).sum(axis=1)
        # rounding slack of the first-layer constant c1 = W1 δµ + b1
        self.c1_tol = 1e-12 * (1.0 + np.abs(weights[0]) @ np.abs(delta_mu) + np.abs(biases[0]))

    def forward(self, delta: np.ndarray) -> np.ndarray:
        z = self.weights[0] @ delta + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            z = w @ np.maximum(z, 0.0) + b
        return z

    def pre_activations(self, delta: np.ndarray) -> list[np.ndarray]:
        z = self.weights[0] @ delta + self.biases[0]
        out = [z]
        for w, b in zip(self.weights[1:-1], self.biases[1:-1], strict=True):
            z = w @ np.maximum(z, 0.0) + b
            out.append(z)
        return out


def _coo(block, row0, col0):
    m = sp.coo_matrix(block)
    return m.row + row0, m.col + col0, m.data


class RelaxationLP:
    """The LP above for one target, kept in a HiGHS instance and re-solved warm.

    Parameters
    ----------
    prob : Problem
    target : int
    radius : float
        ``U``.
    bounds : list of (l, u)
        Root pre-activation bounds per hidden layer (valid over ``P_U``).
    v_img, resid : ndarray or None
        Potentials ``V`` and residual ``E`` of ``W_1`` (feasible problems); None selects
        the flow form.
    """

    def __init__(
        self,
        prob: Problem,
        target: int,
        radius: float,
        bounds,
        v_img=None,
        resid=None,
        threads: int = 1,
    ):
        self.prob = prob
        self.target = int(target)
        self.radius = float(radius)
        n0, npix = prob.n0, prob.npix
        hidden = prob.hidden
        self.image_form = v_img is not None
        self.hidden = hidden
        # ---------------------------------------------------------------- columns
        col = 2 * n0
        if self.image_form:
            self.nu0 = col
            col += npix
        self.zoff = []
        for n in hidden:
            self.zoff.append(col)
            col += 2 * n
        ncol = col
        self.ncol = ncol
        cl = np.zeros(ncol)
        cu = np.full(ncol, self.radius)
        if self.image_form:
            if prob.feasible:
                cl[self.nu0 : self.nu0 + npix] = 0.0
                mass = np.repeat(prob.channel_mass, npix // prob.channels)
                cu[self.nu0 : self.nu0 + npix] = np.maximum(mass, 0.0) * (1 + 1e-9) + 1e-12
            else:
                cl[self.nu0 : self.nu0 + npix] = prob.x0 - self.radius
                cu[self.nu0 : self.nu0 + npix] = prob.x0 + self.radius
        cost = np.zeros(ncol)
        cost[: 2 * n0] = 1.0
        # ---------------------------------------------------------------- rows
        rows, cols, vals = [], [], []
        rl, ru = [], []
        r = 0
        amat = prob.amat.tocoo()

        def add(rr, cc, vv):
            rows.append(np.asarray(rr))
            cols.append(np.asarray(cc))
            vals.append(np.asarray(vv, dtype=np.float64))

        if self.image_form:
            # ν - A p + A q = x0
            add(np.arange(npix) + r, self.nu0 + np.arange(npix), np.ones(npix))
            add(amat.row + r, amat.col, -amat.data)
            add(amat.row + r, amat.col + n0, amat.data)
            rl.append(prob.x0)
            ru.append(prob.x0)
            self.row_img = r
            r += npix
        elif prob.feasible:
            # A p - A q ≥ -x0
            add(amat.row + r, amat.col, amat.data)
            add(amat.row + r, amat.col + n0, -amat.data)
            rl.append(-prob.x0)
            ru.append(np.full(npix, INF))
            r += npix
        # ball
        add(np.full(2 * n0, r), np.arange(2 * n0), np.ones(2 * n0))
        rl.append(np.array([-INF]))
        ru.append(np.array([self.radius]))
        self.row_ball = r
        r += 1
        # first-layer affine map, used by layer-1 rows or (linear chain) the margin row
        w1 = prob.weights[0]
        if self.image_form:
            keep_thr = 1e-13 * max(1.0, float(np.abs(w1).max(initial=0.0)))
            e_keep = np.where(np.abs(resid) > keep_thr, resid, 0.0)
            e_drop = np.abs(resid - e_keep).max(axis=1) if resid.size else np.zeros(0)
            first_const = prob.c1 - v_img @ prob.x0
            first_tol = (
                prob.c1_tol + 1e-12 * (np.abs(v_img) @ np.abs(prob.x0)) + e_drop * self.radius
            )
        else:
            first_const = prob.c1.copy()
            first_tol = prob.c1_tol.copy()

        def first_layer_rows(coef, row0):
            """Rows ``coef @ (first-layer map)`` as sparse triplets over the LP columns."""
            if self.image_form:
                a = coef @ v_img
                rr, cc, vv = _coo(a, row0, self.nu0)
                add(rr, cc, -vv)
                e = coef @ e_keep
                if np.any(e):
                    rr, cc, vv = _coo(e, row0, 0)
                    add(rr, cc, -vv)
                    add(rr, cc + n0, vv)
            else:
                a = coef @ w1
                rr, cc, vv = _coo(a, row0, 0)
                add(rr, cc, -vv)
                add(rr, cc + n0, vv)

        self.row_layer, self.row_act, self.row_tri = [], [], []
        tri_rows, tri_cols = [], []
        for k, n in enumerate(hidden):
            zo = self.zoff[k]
            add(np.arange(n) + r, zo + np.arange(n), np.ones(n))
            if k == 0:
                first_layer_rows(np.eye(n), r)
                rl.append(first_const - first_tol)
                ru.append(first_const + first_tol)
            else:
                rr, cc, vv = _coo(prob.weights[k], r, self.zoff[k - 1] + hidden[k - 1])
                add(rr, cc, -vv)
                rl.append(prob.biases[k].copy())
                ru.append(prob.biases[k].copy())
            self.row_layer.append(r)
            r += n
            # a - z ≥ 0
            add(np.arange(n) + r, zo + n + np.arange(n), np.ones(n))
            add(np.arange(n) + r, zo + np.arange(n), -np.ones(n))
            rl.append(np.zeros(n))
            ru.append(np.full(n, INF))
            self.row_act.append(r)
            r += n
            # triangle: a - s z ≤ -s l  (coefficient of z set per node)
            add(np.arange(n) + r, zo + n + np.arange(n), np.ones(n))
            tri_rows.append(np.arange(n) + r)  # z-coefficient -s, set per node
            tri_cols.append(zo + np.arange(n))
            rl.append(np.full(n, -INF))
            ru.append(np.full(n, INF))
            self.row_tri.append(r)
            r += n
        # margin row: f_t - f_y ≥ κ
        y, t = prob.label, self.target
        wt = prob.weights[-1][t] - prob.weights[-1][y]
        bt = prob.biases[-1][t] - prob.biases[-1][y]
        if hidden:
            ao = self.zoff[-1] + hidden[-1]
            nz = np.nonzero(wt)[0]
            add(np.full(nz.size, r), ao + nz, wt[nz])
            self.margin_const = -bt
            self.margin_tol = 0.0
        else:
            coef = (np.eye(prob.num_classes)[t] - np.eye(prob.num_classes)[y])[None, :]
            first_layer_rows(coef, r)  # writes -(coef·map); the sign is flipped below
            self.margin_const = -float((coef @ first_const)[0])
            self.margin_tol = float((np.abs(coef) @ first_tol)[0])
        self.row_margin = r
        rl.append(np.array([self.margin_const - self.margin_tol]))
        ru.append(np.array([INF]))
        r += 1
        nrow = r
        rows_a = np.concatenate(rows)
        cols_a = np.concatenate(cols)
        vals_a = np.concatenate(vals)
        if not hidden:
            # first_layer_rows wrote -(coef·map) for the margin row; flip its sign
            sel = rows_a == self.row_margin
            vals_a[sel] = -vals_a[sel]
        # static matrix (for the safe bound): triangle z-coefficients added per node
        static = sp.csr_matrix((vals_a, (rows_a, cols_a)), shape=(nrow, ncol))
        static.sum_duplicates()
        if tri_rows:
            tr, tc = np.concatenate(tri_rows), np.concatenate(tri_cols)
            rows_a = np.concatenate([rows_a, tr])
            cols_a = np.concatenate([cols_a, tc])
            vals_a = np.concatenate([vals_a, -np.ones(tr.size)])
        mat = sp.csr_matrix((vals_a, (rows_a, cols_a)), shape=(nrow, ncol))
        mat.sum_duplicates()
        self.nrow = nrow
        self.cost = cost
        self.cl, self.cu = cl, cu
        self.rl, self.ru = np.concatenate(rl), np.concatenate(ru)
        self.mat_t = static.T.tocsr()
        self.abs_mat_t = abs(self.mat_t)
        self.slope = [np.ones(n) for n in hidden]
        # ---------------------------------------------------------------- HiGHS
        h = new_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("presolve", "off")
        h.setOptionValue("threads", int(threads))
        lp = highspy.HighsLp()
        lp.num_col_ = ncol
        lp.num_row_ = nrow
        lp.col_cost_ = cost
        lp.col_lower_ = cl
        lp.col_upper_ = cu
        lp.row_lower_ = self.rl
        lp.row_upper_ = self.ru
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = mat.indptr.astype(np.int32)
        lp.a_matrix_.index_ = mat.indices.astype(np.int32)
        lp.a_matrix_.value_ = mat.data.astype(np.float64)
        lp.a_matrix_.num_col_ = ncol
        lp.a_matrix_.num_row_ = nrow
        h.passModel(lp)
        self.h = h
        self.node_key = None
        self.margin_lo = None
        self.set_margin(0.0)

    # ------------------------------------------------------------------ state changes
    def set_time_limit(self, seconds: float | None) -> None:
        """At most ``seconds`` for the next :meth:`solve` (None: no limit)."""
        set_time_limit(self.h, seconds)

    def set_margin(self, kappa: float) -> None:
        """Lower bound ``κ`` of ``f_t - f_y`` (0 for bounds, > 0 for witnesses)."""
        if self.margin_lo == kappa:
            return
        self.margin_lo = kappa
        lo = self.margin_const + kappa - self.margin_tol
        self.rl[self.row_margin] = lo
        self.h.changeRowBounds(self.row_margin, lo, INF)

    def set_radius(self, radius: float) -> None:
        """Set the ball row ``1ᵀ(p + q) ≤ radius``, at most the radius the LP was built
        with (the box ``p, q ≤ U`` of the columns stays valid under any smaller ball)."""
        radius = min(float(radius), self.radius)
        if radius != self.ru[self.row_ball]:
            self.ru[self.row_ball] = radius
            self.h.changeRowBounds(self.row_ball, -INF, radius)

    def set_node(self, bounds, splits) -> None:
        """Apply a node: pre-activation bounds ``(l, u)`` per layer and splits."""
        cols, clo, chi = [], [], []
        rows, rlo, rhi = [], [], []
        for k, n in enumerate(self.hidden):
            l, u = bounds[k]
            s = splits[k]
            lo = np.where(s > 0, np.maximum(l, 0.0), l)
            hi = np.where(s < 0, np.minimum(u, 0.0), u)
            hi = np.maximum(hi, lo)  # an empty interval is left to the LP (infeasible row)
            active = lo >= 0
            inactive = hi <= 0
            unstable = ~(active | inactive)
            zo = self.zoff[k]
            cols.append(np.arange(zo, zo + 2 * n))
            clo.append(np.concatenate([lo, np.maximum(lo, 0.0)]))
            chi.append(np.concatenate([hi, np.where(inactive, 0.0, np.maximum(hi, 0.0))]))
            rows.append(np.arange(self.row_act[k], self.row_act[k] + n))
            rlo.append(np.zeros(n))
            rhi.append(np.where(active, 0.0, INF))
            width = np.where(unstable, hi - lo, 1.0)
            slope = np.where(unstable, hi / width, 0.0)
            rhs = np.where(unstable, -slope * lo, INF)
            changed = np.nonzero(slope != self.slope[k])[0]
            for j in changed:
                self.h.changeCoeff(int(self.row_tri[k] + j), int(zo + j), float(-slope[j]))
            self.slope[k] = slope
            rows.append(np.arange(self.row_tri[k], self.row_tri[k] + n))
            rlo.append(np.full(n, -INF))
            rhi.append(rhs)
        if cols:
            c = np.concatenate(cols)
            self.cl[c] = np.concatenate(clo)
            self.cu[c] = np.concatenate(chi)
            self.h.changeColsBounds(c.size, c.astype(np.int32), self.cl[c], self.cu[c])
            r = np.concatenate(rows)
            self.rl[r] = np.concatenate(rlo)
            self.ru[r] = np.concatenate(rhi)
            self.h.changeRowsBounds(r.size, r.astype(np.int32), self.rl[r], self.ru[r])

    # ------------------------------------------------------------------ solving
    def _mat_t_y(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Mᵀy`` and ``|M|ᵀ|y|`` for the current triangle slopes."""
        mty = self.mat_t @ y
        amty = self.abs_mat_t @ np.abs(y)
        for k, n in enumerate(self.hidden):
            zo = self.zoff[k]
            yt = y[self.row_tri[k] : self.row_tri[k] + n]
            mty[zo : zo + n] -= self.slope[k] * yt
            amty[zo : zo + n] += np.abs(self.slope[k] * yt)
        return mty, amty

    def safe_bound(self, y: np.ndarray, cost: np.ndarray | None = None) -> float:
        """A valid lower bound of the LP from any row duals ``y`` (see module notes)."""
        c = self.cost if cost is None else cost
        y = _numerics.clean_duals(y, self.rl, self.ru)
        mty, amty = self._mat_t_y(y)
        return _numerics.safe_lp_bound(c, y, mty, amty, self.rl, self.ru, self.cl, self.cu)

    def solve(self):
        """Solve; returns ``(status, lower_bound, x)``.

        ``status`` is ``"optimal"`` (``lower_bound`` from the safe dual bound, ``x`` the
        primal solution), ``"infeasible"`` (certified by a dual ray; bound ``inf``) or
        ``"unknown"`` (bound ``-inf``: the caller keeps the parent's bound).
        """
        h = self.h
        h.run()
        st = h.getModelStatus()
        if st == _OPTIMAL:
            sol = h.getSolution()
            y = np.asarray(sol.row_dual)
            x = np.asarray(sol.col_value)
            lb = self.safe_bound(y)
            lb2 = self.safe_bound(-y)
            return "optimal", max(lb, lb2), x
        if st == _INFEASIBLE:
            status, has_ray, ray = h.getDualRay()
            if has_ray:
                ray = np.asarray(ray)
                zero = np.zeros(self.ncol)
                for sgn in (1.0, -1.0):
                    if self.safe_bound(sgn * ray, cost=zero) > 0.0:
                        return "infeasible", np.inf, None
            logger.debug("LP infeasible without a certifying ray (target %d)", self.target)
            return "unknown", -np.inf, None
        logger.debug("LP status %s (target %d)", h.modelStatusToString(st), self.target)
        return "unknown", -np.inf, None

    def flow(self, x: np.ndarray) -> np.ndarray:
        """``g = p - q`` of a primal solution."""
        n0 = self.prob.n0
        return x[:n0] - x[n0 : 2 * n0]

    def layer_values(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(z_k, a_k)`` of a primal solution."""
        n = self.hidden[k]
        zo = self.zoff[k]
        return x[zo : zo + n], x[zo + n : zo + 2 * n]

    def row_duals(self) -> np.ndarray:
        return np.asarray(self.h.getSolution().row_dual)

    def col_duals(self) -> np.ndarray:
        return np.asarray(self.h.getSolution().col_dual)
