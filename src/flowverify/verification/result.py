"""The record of certifying one image (:class:`CertifyResult`): status, radius in both
units, the method and reference behind it, timings and the witness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowverify.core.results import Status, jsonable


@dataclass
class CertifyResult:
    """Certification of one image.

    Attributes
    ----------
    index : int
        Index of the image (in ``data`` when ``indices`` are given, else in the batch).
    label, prediction : int
        The class certified and the model's class on the image.
    method, certifier : str
        As resolved (see :data:`METHODS`, :data:`CERTIFIERS`).
    references : list of str
        Names of the references used (``uniform``, ``random#0``, ``data#17``, ...).
    status : Status
        ``certified`` (radius > 0 proven; with ``eps``: the ball of radius ``eps``),
        ``falsified`` (``eps`` only: an adversarial image within ``eps``, see
        ``witness``), ``unknown``, ``misclassified`` (radius 0) or ``error``.
    radius : float
        Certified W1 radius, normalised unit (image mass 1): every image within it is
        classified ``label``.  For an exact result, the W1 distance to the closest
        image of another class (its proven lower bound).
    radius_raw : float
        The same in data units (``radius * mass``).
    exact : bool
        True only for a complete method that finished (``radius`` is exact).
    per_reference : dict
        Reference name -> certified radius (normalised).
    seconds : float
        Wall time (a batch's time divided by its size for batched methods).
    eps, eps_raw : float or None
        The radius decided (``eps=`` mode), normalised and raw.
    lower, upper : float or None
        Proven lower bound (normalised; equal to ``radius``) and the W1 distance of
        the closest adversarial image known (normalised; ``inf`` if none, ``None`` if
        not searched).
    upper_raw : float or None
        ``upper`` in data units.
    mass : float
        ``s``: normalised = raw / s (largest channel mass).
    best_reference : str or None
        The reference that gave ``radius``.
    converged : bool
        Whether the radius search reached its tolerance (else it was cut by ``timeout``;
        the radius is still certified).
    solver_status : str or None
        Complete methods: the solver's status.
    message : str or None
        Error message (``status="error"``) or notes.
    nodes : int or None
        Complete methods: the branch-and-bound subdomains (nodes) bounded.
    witness : ndarray or None
        ``(C, H, W)`` adversarial image (exact results, falsified decisions, and the
        closest one found by a complete method that stopped at its limit); excluded
        from :meth:`to_dict`.  For ``complete-ball`` it may have negative pixels.
    witness_kind : str or None
        What ``witness`` is: ``"closest"`` (exact result: the closest adversarial image,
        at W1 ``upper`` = ``radius``), ``"within-eps"`` (falsified decision) or
        ``"closest-found"`` (``unknown`` result of a complete method: the closest
        adversarial image found, at W1 ``upper``; it proves only that the radius is at
        most ``upper``, not that no closer one exists); ``None`` without a witness.
    """

    index: int
    label: int
    prediction: int
    method: str
    certifier: str
    references: list[str]
    status: Status
    radius: float
    radius_raw: float
    exact: bool = False
    per_reference: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    eps: float | None = None
    eps_raw: float | None = None
    lower: float | None = None
    upper: float | None = None
    upper_raw: float | None = None
    mass: float = 1.0
    best_reference: str | None = None
    converged: bool = True
    solver_status: str | None = None
    message: str | None = None
    witness: np.ndarray | None = field(default=None, repr=False)
    nodes: int | None = None
    witness_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field but ``witness`` (``inf`` -> ``"inf"``)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "witness"}
        out["status"] = str(self.status)
        out["unit"] = "normalised"
        return jsonable({"kind": "certify", **out})
