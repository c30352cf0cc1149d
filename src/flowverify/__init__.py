"""flowverify: verification of image classifiers against Wasserstein (W1) perturbations.

An image ``µ`` is written as a flow ``δµ`` from a reference ``R`` (``µ = R + Aδµ``); W1
between images is the L1 distance between flows minimised over the fibre (Theorem 1),
and the first affine layer of a model absorbs ``A`` (Corollary 2.1).  A W1 ball thus
becomes an L1 ball (vanilla) or an L1 ball intersected with ``{R + Aδ >= 0}``
(fine-tuned) in flow space, where certifiers and a PGD attack apply.

Packages follow the pipeline, each importing only from those before it:
:mod:`~flowverify.core` (results, validation), :mod:`~flowverify.transport` (Δ, A, Δ⁻¹,
W1, references, min-cost flow, W1 projection), :mod:`~flowverify.model` (Corollary 2.1,
loading, ONNX), :mod:`~flowverify.verification` (section 3, Appendix A: the bound
engine, LP, branch and bound, MILP), :mod:`~flowverify.attacks` (section 4, Algorithm 1),
:mod:`~flowverify.baselines` (randomised smoothing), :mod:`~flowverify.api` (the public
:func:`certify`, composing the certifiers with the attack and the baseline),
:mod:`~flowverify.io` (images),
:mod:`~flowverify.runner` (parallel, resumable runs), :mod:`~flowverify.report`,
:mod:`~flowverify.paper` (the paper's claims) and :mod:`~flowverify.cli`.
"""

from flowverify.api import certify
from flowverify.attacks import AttackResult, WassersteinPGD, attack
from flowverify.model.flow_model import FlowModel
from flowverify.transport.flows import apply_flow, incidence_matrix, inverse_flow, w1_distance
from flowverify.transport.references import make_reference, parse_references
from flowverify.verification import CertifyResult

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
