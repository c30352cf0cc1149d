"""The result of an exact-radius search (:func:`~.complete.exact_radius`) and the helpers
its searches share (the LP data of an image, the block incidence matrix of a
multi-channel image, the W1 diameter, the class of a witness)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import scipy.sparse as sp

from flowverify.transport.flows import incidence_matrix
from flowverify.verification._relaxlp import Problem

__all__ = ["ExactResult", "ExactStatus", "chain_problem"]


class ExactStatus(str, Enum):
    """How an exact search ended (compares equal to its value)."""

    #: ``lower`` and ``upper`` agree to ``rtol``: the exact radius.
    OPTIMAL = "optimal"
    #: The time limit came first: ``lower`` proven, ``upper`` the best verified witness.
    TIMEOUT = "timeout"
    #: The search was restricted to a radius (``upper_bound``) and proved ``r* >= lower``
    #: there; whatever lies beyond it (``upper``, if a witness was found) is not proven.
    BOUNDED = "bounded"
    #: The search ended, but no candidate adversarial passed the exact check: ``lower``
    #: is proven, nothing is claimed above it.
    UNVERIFIED = "unverified"
    #: No image of the same mass is classified otherwise (``lower = upper = inf``).
    INFEASIBLE = "infeasible"
    #: The caller's hints were inconsistent (an ``upper_bound`` with nothing below it).
    ERROR = "error"


@dataclass
class ExactResult:
    """Result of :func:`exact_radius` (radii in flow-L1 units = raw W1 data units).

    Attributes
    ----------
    status : ExactStatus
    lower : float
        Proven lower bound on the radius.
    upper : float
        ``‖δ* - δµ‖₁`` of the best verified adversarial flow; ``inf`` if none.
    witness_flow : ndarray or None
        ``(C*D,)`` flow ``δ*`` with ``argmax f̃(δ*) ≠ label`` and (if feasible)
        ``R + Aδ* ≥ 0``.
    target : int or None
        The class of the witness.
    solver_status : str
        Details (algorithm, solver messages).
    seconds : float
    nodes : int
        Branch-and-bound nodes expanded (MILP: HiGHS nodes).
    """

    status: ExactStatus
    lower: float
    upper: float
    witness_flow: np.ndarray | None
    target: int | None
    solver_status: str
    seconds: float
    nodes: int

    @classmethod
    def no_witness(
        cls, status: ExactStatus, lower: float, info: str, seconds: float, nodes: int = 0
    ):
        """A result without a witness (``upper = inf``)."""
        return cls(status, lower, math.inf, None, None, info, seconds, nodes)


def _block_incidence(height: int, width: int, channels: int) -> sp.csr_matrix:
    a = incidence_matrix(height, width)
    if channels == 1:
        return a.tocsr()
    return sp.block_diag([a] * channels, format="csr")


def chain_problem(chain, delta_mu, reference, label, *, height, width, feasible) -> Problem:
    """The LP data of one image (:class:`~._relaxlp.Problem`): its fused flow-domain chain
    (float64), flow ``δµ`` and reference (flat, ``C*H*W``; ``C`` from its size)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    channels = reference.size // (height * width)
    return Problem(
        [np.asarray(w, dtype=np.float64) for w in chain.weights],
        [np.asarray(b, dtype=np.float64) for b in chain.biases],
        np.asarray(delta_mu, dtype=np.float64).reshape(-1),
        reference,
        int(label),
        height=height,
        width=width,
        channels=channels,
        feasible=feasible,
        amat=_block_incidence(height, width, channels),
    )


def _diameter(prob: Problem) -> float:
    """Largest W1 distance between two images of the same mass (L1 ground metric)."""
    return float(np.sum(np.maximum(prob.channel_mass, 0.0))) * (prob.height + prob.width - 2)


def _witness_target(prob: Problem, delta: np.ndarray) -> int:
    logits = prob.forward(delta)
    others = [t for t in range(prob.num_classes) if t != prob.label]
    return int(others[int(np.argmax(logits[others]))])
