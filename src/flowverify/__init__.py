"""flowverify: verification of image classifiers against Wasserstein (W1) perturbations.

An image ``µ`` is written as a flow ``δµ`` from a reference ``R`` (``µ = R + Aδµ``); W1
between images is the L1 distance between flows minimised over the fibre (Theorem 1),
and the first affine layer of a model absorbs ``A`` (Corollary 2.1).  A W1 ball thus
becomes an L1 ball (vanilla) or an L1 ball intersected with ``{R + Aδ >= 0}``
(fine-tuned) in flow space, where certifiers and a PGD attack apply.

Modules follow the pipeline: :mod:`~flowverify.flows` (Δ, A, Δ⁻¹, W1),
:mod:`~flowverify.references`, :mod:`~flowverify.flowmodel` (Corollary 2.1),
:mod:`~flowverify.certify` (section 3, Appendix A), :mod:`~flowverify.attack` (section 4,
Algorithm 1), :mod:`~flowverify.smoothing` (the Levine-Feizi baseline),
:mod:`~flowverify.datasets` and :mod:`~flowverify.models` (I/O),
:mod:`~flowverify.runner` (parallel, resumable runs), :mod:`~flowverify.cli`.

``flowverify.certify`` and ``flowverify.attack`` are the entry-point *functions*; their
modules stay importable as ``from flowverify.certify import bounds`` or
``from flowverify.attack import WassersteinPGD``.
"""

# The entry points shadow their modules' names on the package (``flowverify.certify(...)``,
# ``flowverify.attack(...)``); ``sys.modules`` keeps the modules for ``from ... import``.
from .attack import AttackResult, WassersteinPGD, attack
from .certify import CertifyResult, certify
from .flowmodel import FlowModel
from .flows import apply_flow, incidence_matrix, inverse_flow, w1_distance
from .references import make_reference, parse_references

__version__ = "0.1.0"

__all__ = [
    "AttackResult",
    "CertifyResult",
    "FlowModel",
    "WassersteinPGD",
    "attack",
    "certify",
    "__version__",
    "apply_flow",
    "incidence_matrix",
    "inverse_flow",
    "make_reference",
    "parse_references",
    "w1_distance",
]
