"""The outcome of Wasserstein smoothing's CERTIFY for one image (paper section 3.3; Levine
& Feizi, AISTATS 2020): :class:`SmoothingResult`, a record in the certify-record schema
of :class:`flowverify.verification.CertifyResult` plus the smoothing fields, and
:data:`ABSTAIN`, the prediction of a smoothed classifier that abstains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowverify.core.results import Status, jsonable

__all__ = ["ABSTAIN", "SmoothingResult"]

#: Prediction returned when the smoothed classifier abstains.
ABSTAIN = -1

METHOD = "smoothing"
CERTIFIER = "laplace-cohen"


@dataclass
class SmoothingResult:
    """Outcome of CERTIFY for one image (smoothed classifier, Laplace noise on flows).

    Attributes
    ----------
    index : int
        Data-set index of the image.
    label : int
        The class certified: the true class, or ``c_A`` when no labels were given.
    prediction : int
        The smoothed classifier's class ``c_A``, or :data:`ABSTAIN` (``-1``).
    status : Status
        ``certified`` (``c_A`` = label, ``p_lower > 1/2``), ``misclassified``
        (``c_A`` ≠ label, ``p_lower > 1/2``) or ``unknown`` (abstain: ``p_lower <= 1/2``).
    radius : float
        Certified normalised W1 radius ``-b ln(2(1 - p_lower))`` (0 unless certified).
    radius_lf : float
        Levine & Feizi's radius ``(b/2) ln(p_lower/(1 - p_lower))`` (0 unless certified).
    radius_raw, radius_lf_raw : float
        The same in raw units: × the image's smallest channel mass (× ``mass`` for one
        channel), a sound raw radius for every channel.
    p_lower : float
        Clopper–Pearson lower bound on ``P[f(x + s·Aη) = c_A]`` at level ``alpha``.
    guess : int
        ``c_A``, the top class of the ``n0`` selection samples (even when abstaining).
    count : int
        ``n_A``: estimation samples classified as ``c_A``.
    counts : list of int
        Estimation counts per class (length K).
    mass : float
        Image mass ``s`` (data units; the largest channel mass for ``C > 1``), as in
        every record.
    seconds : float
        Wall time for this image.
    config : dict
        ``sigma``, ``b``, ``n0``, ``n_samples``, ``alpha``, ``seed``, ``batch_size``, ``unit``.
    method, certifier, exact, references, per_reference, witness
        Fields shared with :class:`flowverify.verification.CertifyResult`: ``"smoothing"``,
        ``"laplace-cohen"``, False, ``[]`` and ``{}`` (the smoothed classifier does not
        depend on the reference: ``Δ(R, δµ + η) = µ + Aη``), None.
    """

    index: int
    label: int
    prediction: int
    status: Status
    radius: float
    radius_lf: float
    radius_raw: float
    radius_lf_raw: float
    p_lower: float
    guess: int
    count: int
    counts: list[int]
    mass: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    method: str = METHOD
    certifier: str = CERTIFIER
    exact: bool = False
    references: list[str] = field(default_factory=list)
    per_reference: dict[str, float] = field(default_factory=dict)
    witness: None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """One JSON object in the certify-record schema (plus smoothing fields)."""
        return jsonable(
            {
                "kind": "smoothing",
                "index": self.index,
                "label": self.label,
                "prediction": self.prediction,
                "method": self.method,
                "certifier": self.certifier,
                "references": list(self.references),
                "status": self.status,
                "radius": self.radius,
                "radius_raw": self.radius_raw,
                "exact": self.exact,
                "per_reference": dict(self.per_reference),
                "radius_lf": self.radius_lf,
                "radius_lf_raw": self.radius_lf_raw,
                "p_lower": self.p_lower,
                "guess": self.guess,
                "count": self.count,
                "counts": list(self.counts),
                "mass": self.mass,
                "seconds": self.seconds,
                "config": self.config,
            }
        )
