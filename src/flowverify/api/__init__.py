"""The public operations, composed from the stages below: :func:`certify` (the certifiers
of :mod:`flowverify.verification` with the attack of :mod:`flowverify.attacks` as the
complete methods' first upper bound, and the smoothing baseline of
:mod:`flowverify.baselines`)."""

from flowverify.api.certification import certify, iter_certify, pgd_adversary

__all__ = ["certify", "iter_certify", "pgd_adversary"]
