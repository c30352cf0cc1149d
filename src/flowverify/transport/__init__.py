"""Flows and optimal transport on the pixel grid: the flow parametrisation
``Δ(R, δ) = R + Aδ`` and its inverse, W1 as the L1 distance between flows (Theorem 1,
:mod:`.flows`), references ``R`` (:mod:`.references`), the exact grid min-cost flow
(:mod:`.mincostflow`) and the projection onto a W1 ball used by the attack
(:mod:`.projection`).
"""

from flowverify.transport.flows import (
    INVERSE_METHODS,
    apply_flow,
    apply_flow_adjoint,
    flow_dim,
    grid_shape,
    incidence_matrix,
    inverse_flow,
    w1_distance,
)
from flowverify.transport.references import (
    REFERENCE_KINDS,
    Reference,
    make_reference,
    parse_references,
)

__all__ = [
    "INVERSE_METHODS",
    "REFERENCE_KINDS",
    "Reference",
    "apply_flow",
    "apply_flow_adjoint",
    "flow_dim",
    "grid_shape",
    "incidence_matrix",
    "inverse_flow",
    "make_reference",
    "parse_references",
    "w1_distance",
]
