"""Certifiers in the flow domain (paper section 3, Appendix A; SPEC section 4).

:func:`certify` is the public entry point (vanilla, feasible, complete and complete-ball
radii, reference fine-tuning); :mod:`~flowverify.verification.bounds` holds the bound
propagation (CROWN / alpha-CROWN over the L1 ball and the feasibility polytope),
:mod:`~flowverify.verification.lp` the LP relaxation.
"""

from flowverify.verification.api import CERTIFIERS, METHODS, CertifyResult, certify

__all__ = ["CERTIFIERS", "METHODS", "CertifyResult", "certify"]
