r"""The ``lp`` certifier of ``feasible``: the triangle relaxation of a ReLU chain over the
feasibility polytope (Lemma 5, Theorem 6), solved by HiGHS.

For one image at a probe radius ``ε`` and a class ``t`` that CROWN over the polytope does
not already rule out, the LP of the exact searches (:class:`~._relaxlp.RelaxationLP`,
the one LP builder of the package) with the engine's pre-activation bounds at ``ε``
(:func:`~.chain_bounds.relu_bounds`)

.. math::

    d_t = \min\ \|\gamma\|_1 \quad\text{s.t.}\quad \nu = \mu + A\gamma \ge 0,\
    \|\gamma\|_1 \le \varepsilon,\ \text{the relaxed network},\ f_t \ge f_y

is a lower bound of the distance to class ``t`` among the images within ``ε`` (the
relaxation contains the network's graph there): the margin ``f_y - f_t`` stays positive
on the polytope of every radius below ``d_t``, and below ``ε`` when the LP is infeasible.
The certified radius at the probe is ``min_t`` of these (CROWN's where it suffices).

Soundness does not rely on the solver's tolerances: ``d_t`` is the Neumaier–Shcherbina
bound from HiGHS's row duals (:meth:`~._relaxlp.RelaxationLP.safe_bound`), infeasibility
needs a certifying dual ray, and an LP that does not finish gives no certificate (the
CROWN radius stands).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.model.flow_model import FlowModel
from flowverify.transport.flows import inverse_flow
from flowverify.verification._chain import affine_chain
from flowverify.verification._exact import chain_problem
from flowverify.verification._relaxlp import Problem, RelaxationLP
from flowverify.verification.chain_bounds import lp_image_form, relu_bounds
from flowverify.verification.checks import INVERSE_METHOD

__all__ = ["LPOracle", "chain_problems"]

logger = logging.getLogger(__name__)


def chain_problems(model64, x: np.ndarray, refs: np.ndarray, labels, *, input_scale: str):
    """The fused flow-domain chain of each image (Corollary 2.1) as LP problems over the
    polytope: ``x``, ``refs`` ``(n, C, H, W)``, ``labels (n,)``; ``model64`` float64."""
    n, c, h, w = x.shape
    out = []
    for i in range(n):
        ref = torch.as_tensor(refs[i : i + 1])
        chain = affine_chain(FlowModel(model64, ref, input_scale=input_scale, fuse=True), 0)
        dmu = inverse_flow(refs[i], x[i], method=INVERSE_METHOD)
        out.append(chain_problem(chain, dmu, refs[i], labels[i], height=h, width=w, feasible=True))
    return out


class LPOracle:
    """``F(ε)`` for the ``lp`` certifier: the polytope CROWN radius, improved by the LP.

    ``engine`` (an :class:`~flowverify.verification.engine.EngineProblem` over the W1
    polytope on the images of ``probs``, :func:`chain_problems`) gives the CROWN radius
    of each margin at ``ε``; for the margins it leaves below ``ε`` the LP's ``d_t``
    (module notes) certifies the largest radius it can.
    """

    def __init__(self, probs: list[Problem], engine, *, time_limit: float | None = None):
        self.probs, self.engine, self.time_limit = probs, engine, time_limit

    def __call__(self, idx: np.ndarray, eps: np.ndarray) -> np.ndarray:
        eng = self.engine
        eps = np.asarray(eps, dtype=np.float64)
        idx_e, eps_t = eng._eps(idx, eps)
        with torch.no_grad():
            _, _, lin = eng.margins(idx_e, eps_t)
            rad = eng._radii(lin, eps_t, idx_e).cpu().numpy()
        for b, i in enumerate(np.asarray(idx)):
            e, prob = float(eps[b]), self.probs[i]
            todo = np.flatnonzero(rad[b] < e)
            if e <= 0 or todo.size == 0 or not prob.hidden:
                continue
            try:
                for j, r_t in self._lp_radii(prob, e, todo).items():
                    rad[b, j] = max(rad[b, j], r_t)
            except Exception as exc:  # a solver failure never invalidates the CROWN radius
                raise_if_interrupted(exc)
                logger.exception("lp: the LP relaxation failed; keeping the CROWN radius")
        return rad.min(axis=1)

    def _lp_radii(self, prob: Problem, eps: float, todo) -> dict[int, float]:
        """``{margin j: certified radius}`` from the LPs of the margins ``todo`` (rows of
        :func:`~.flownet.margin_spec`: class ``j``, or ``j + 1`` from the label on)."""
        bounds = relu_bounds(prob, eps)
        v_img, resid = lp_image_form(prob)
        splits = [np.zeros(n, dtype=np.int8) for n in prob.hidden]
        out = {}
        for j in todo:
            t = int(j) + (int(j) >= prob.label)
            lp = RelaxationLP(prob, t, eps, bounds, v_img=v_img, resid=resid)
            lp.set_node(bounds, splits)
            lp.set_time_limit(self.time_limit)
            status, lower, _ = lp.solve()
            if status == "infeasible":
                out[int(j)] = eps
            elif status == "optimal":
                out[int(j)] = min(max(lower, 0.0), eps)
            else:
                logger.debug("lp: target %d: no certificate (%s)", t, status)
        return out
