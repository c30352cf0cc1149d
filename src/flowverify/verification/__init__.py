r"""Certifiers in the flow domain (paper section 3, Appendix A; SPEC section 4).

The driver :mod:`~flowverify.verification.api` runs a batch of images through one
method: :mod:`~.incomplete` (CROWN and alpha-CROWN on the bound-propagation
:mod:`~.engine` over the W1 ball of Theorem 3 or the W1 polytope of Theorem 6, or the LP
relaxation of :mod:`~.lp`) or :mod:`~.exact_driver` (branch and bound on the engine, the
LP/MILP search of :mod:`~.complete`), with :mod:`~.falsify` as the verifier's own attack.
:mod:`~.numerics` (rounding margins), :mod:`~.ball` (the ball's dual norm),
:mod:`~.polytope` with :mod:`~.polytope_kernels` and :mod:`~.polytope_transform` (the
polytope's Kantorovich dual), :mod:`~.flownet` (the flow-domain network) and
:mod:`~.search` (the radius search) hold the soundness-critical maths every method calls,
once; the LP and MILP searches take their
intermediate bounds from the engine too (:mod:`~.chain_bounds`).  The public
:func:`flowverify.certify` (in :mod:`flowverify.api`) composes them with the attacks.

The flow-domain network of an image (Corollary 2.1, :mod:`~flowverify.verification._chain`) is

.. math::

    z_0 = \tilde W \delta + \tilde b, \qquad z_k = W_k\,\mathrm{relu}(z_{k-1}) + b_k,
    \qquad \text{logits} = z_{L-1},

with :math:`\tilde W = WA / s` (``s`` the input scale).  Two input regions (SPEC section 4):

* vanilla (Theorem 3): the L1 ball :math:`B_\varepsilon(\delta_\mu) = \{\delta :
  \|\delta - \delta_\mu\|_1 \le \varepsilon\}`;
* feasible (Lemma 5, Theorem 6): the polytope :math:`B_\varepsilon(\delta_\mu) \cap
  \{\delta : R + A\delta \ge 0\}`.

**CROWN** (linear bound propagation) writes every pre-activation and every margin
:math:`f_y - f_t` as :math:`\ge \Lambda z_0 + \beta` with ReLUs relaxed by the triangle's
upper line and a lower line of slope :math:`\alpha \in [0, 1]` (CROWN's adaptive choice,
or optimised by gradient: alpha-CROWN).  What remains is to minimise the linear function
:math:`a^T\delta`, :math:`a = \tilde W^T \Lambda^T`, over the region:

* over the ball, by the dual norm: :math:`\min a^T\delta = a^T\delta_\mu -
  \varepsilon\|a\|_\infty`;
* over the polytope, exactly, in image space.  Because the first layer is
  :math:`\tilde W = WA/s`, every such ``a`` is :math:`A^T q` for an image-space map
  ``q = Λ W / s`` (a residual ``E`` from rounding is bounded separately).  With
  :math:`\nu = R + A\delta` the polytope is the set of non-negative images with
  :math:`W_1(\mu, \nu) \le \varepsilon` (Theorem 1), and by LP duality

  .. math::

      \max_{\nu \ge 0,\ W_1(\mu,\nu) \le \varepsilon} q^T(\mu - \nu)
      = \min_{\theta \ge 0}\ \theta\varepsilon + \sum_p \mu_p\,\bigl(q_p - (q \,\square\,
      \theta d)(p)\bigr),
      \qquad (q \,\square\, \theta d)(p) = \min_{p'} q_{p'} + \theta\,\|p - p'\|_1 ,

  an L1 distance transform computed by four sweeps.  Every ``θ`` gives a sound bound,
  the minimum (a cutting-plane search on ``θ`` bracketed by the subgradient ``ε - T(θ)``,
  ``T`` the transport cost of the greedy plan) is the exact polytope minimum, and
  ``θ = ‖Aᵀq‖_∞`` recovers the ball bound, so the polytope bound is never looser than
  the vanilla one.

The certified radius of a fixed relaxation is read off directly: margins stay
positive for all :math:`\varepsilon' \le \varepsilon` up to
:math:`(c_t - \tau)/\|a_t\|_\infty` (ball; for a linear model this is Lemma 7's closed
form) or :math:`\max_\theta (c_t - \tau - K(\theta))/\theta` (polytope).

Soundness: all arithmetic is float64 except the dual norms of intermediate bounds on the
CPU, whose float32 sums carry a rigorous rounding-error term (:mod:`~.ball`);
intermediate bounds are widened by ``BOUND_RTOL`` and margins must exceed
``MARGIN_RTOL * (1 + |c| + ε‖a‖)`` before a radius counts as certified (:mod:`~.numerics`).
"""

from flowverify.verification.api import check_certifiable, references_note
from flowverify.verification.checks import CERTIFIERS, METHODS, UNITS
from flowverify.verification.result import CertifyResult

__all__ = [
    "CERTIFIERS",
    "METHODS",
    "UNITS",
    "CertifyResult",
    "check_certifiable",
    "references_note",
]
