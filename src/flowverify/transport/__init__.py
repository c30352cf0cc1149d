"""Flows and optimal transport on the pixel grid.

The flow parametrisation ``Δ(R, δ) = R + Aδ`` and its inverse, and W1 as the smallest L1
norm of a flow between two images (Theorem 1, :mod:`.flows`); the grid operators ``A``,
``Aᵀ`` and the incidence matrix (:mod:`.grid`); references ``R`` (:mod:`.references`);
the exact grid min-cost flow (:mod:`.mincostflow`, its compiled network simplex in
:mod:`.simplex_kernels`); and the attack's side: feasible-point maps onto the W1 ball
(:mod:`.projection`), budgeted mass moves (:mod:`.transport_plans`) and the compiled
projected-gradient step (:mod:`.pgd_step`).
"""

from flowverify.transport.flows import (
    INVERSE_METHODS,
    apply_flow,
    apply_flow_adjoint,
    grid_shape,
    inverse_flow,
    w1_distance,
)
from flowverify.transport.grid import flow_dim, incidence_matrix
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
