"""Certifiers in the flow domain (paper section 3, Appendix A; SPEC section 4).

The driver :mod:`~flowverify.verification.api` runs a batch of images through one
method: :mod:`~.incomplete` (CROWN and alpha-CROWN on the bound-propagation
:mod:`~.engine` over the W1 ball of Theorem 3 or the W1 polytope of Theorem 6, or the LP
relaxation of :mod:`~.lp`) or :mod:`~.exact_driver` (branch and bound on the engine, the
LP/MILP search of :mod:`~.complete`), with :mod:`~.falsify` as the verifier's own attack.
:mod:`~.bounds` holds the soundness-critical maths every method calls (dual norms, the
Kantorovich dual of the polytope, rounding margins, the radius search).  The public
:func:`flowverify.certify` (in :mod:`flowverify.api`) composes them with the attacks.
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
