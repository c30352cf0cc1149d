"""Statistics of the report: certified accuracy, attack radii, the sandwich check, summaries.

Definitions, all radii in normalised W1 (image mass 1 per channel, L1 ground cost, one
pixel step = 1):

* certified accuracy at ``r``: fraction of the group's digits with ``prediction ==
  label``, status not ``misclassified``/``error`` and ``radius >= r`` (at ``r = 0``: the
  clean accuracy of the certified classifier; an abstaining smoothed classifier,
  ``prediction = -1``, counts as wrong);
* attack radius of a digit: the smallest ``w1`` (else ``w1_bound``) over its successful
  records; 0 if the clean digit is misclassified; ``inf`` if never fooled.  The attack
  curve, the fraction of digits *not* fooled within ``r`` (attack radius ``> r``), is an
  upper bound on the robust accuracy at ``r``;
* sandwich, per digit (records joined by ``index`` across files): best certified lower
  bound ``<=`` exact radius ``<=`` attack radius; any violation is listed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flowverify.core.results import Status
from flowverify.report.records import _STATUSES, ResultGroup

#: Radii (normalised W1) at which the summary tabulates certified accuracy.
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: Tolerances of the sandwich check ``a <= b``: a violation is ``a > b + atol + rtol*|b|``.
SANDWICH_RTOL = 1e-6
SANDWICH_ATOL = 1e-9

#: Suffix of a certify group's ``per_group`` key for the closest adversarial it found.
UPPER_SUFFIX = " (upper)"
_NOT_ROBUST = (Status.MISCLASSIFIED.value, Status.ERROR.value)


def _robust_radius(rec: Mapping[str, Any]) -> float:
    """Proven radius of a certify record: ``-1`` if wrong, else the radius (nan -> 0)."""
    if rec["status"] in _NOT_ROBUST or rec["prediction"] != rec["label"]:
        return -1.0
    r = rec["radius"]
    return 0.0 if math.isnan(r) else max(r, 0.0)


def certified_accuracy(group: ResultGroup, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fraction of the group's digits certified at each radius (normalised W1).

    A digit counts at ``r`` if it is correctly classified, its status is neither
    ``misclassified`` nor ``error`` and its ``radius >= r``.

    Returns
    -------
    ndarray
        Shape ``(len(radii),)``, values in ``[0, 1]`` (nan for an empty group).
    """
    if group.kind != "certify":
        raise ValueError(f"group: expected a certify group, got {group.kind!r}")
    radii = np.asarray(radii, dtype=np.float64)
    rob = np.array([_robust_radius(r) for r in group.records])
    if rob.size == 0:
        return np.full(radii.shape, np.nan)
    return ((rob[None, :] >= 0) & (rob[None, :] >= radii[:, None])).mean(axis=1)


def attack_radii(group: ResultGroup) -> dict[int, float]:
    """Per digit: the smallest W1 of a successful adversarial (normalised).

    ``w1`` is used, else ``w1_bound``; 0 for a misclassified clean digit; ``inf`` when
    no record of the digit succeeded.
    """
    if group.kind != "attack":
        raise ValueError(f"group: expected an attack group, got {group.kind!r}")
    out: dict[int, float] = {}
    for r in group.records:
        i = r["index"]
        if r["prediction"] != r["label"]:
            out[i] = 0.0
            continue
        cur = out.get(i, math.inf)
        if r["success"]:
            w = r["w1"] if not math.isnan(r["w1"]) else r["w1_bound"]
            if math.isnan(w):
                w = r["eps"]
            cur = min(cur, w)
        out[i] = cur
    return out


def not_fooled_fraction(group: ResultGroup, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fraction of digits the attack did not fool within ``r``: attack radius ``> r``.

    An upper bound on the robust accuracy at each radius (normalised W1).
    """
    radii = np.asarray(radii, dtype=np.float64)
    ar = np.array(list(attack_radii(group).values()))
    if ar.size == 0:
        return np.full(radii.shape, np.nan)
    return (ar[None, :] > radii[:, None]).mean(axis=1)


def _median(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.mean(arr)) if arr.size else math.nan


def _certify_summary(g: ResultGroup, radii: np.ndarray) -> dict[str, Any]:
    recs = g.records
    n = len(recs)
    counts = {s: sum(r["status"] == s for r in recs) for s in _STATUSES}
    rob = [_robust_radius(r) for r in recs]
    correct = [v for v in rob if v >= 0]
    return {
        "kind": "certify",
        "label": g.label,
        "source": g.source,
        "method": g.method,
        "count": n,
        "status_counts": counts,
        "exact_count": sum(bool(r["exact"]) for r in recs),
        "clean_accuracy": len(correct) / n if n else math.nan,
        "certified_fraction": counts[Status.CERTIFIED.value] / n if n else math.nan,
        "mean_radius": _mean(correct),
        "median_radius": _median(correct),
        "mean_seconds": _mean([r["seconds"] for r in recs]),
        "certified_accuracy": dict(
            zip(map(float, radii), map(float, certified_accuracy(g, radii)), strict=True)
        ),
    }


def _attack_summary(g: ResultGroup, radii: np.ndarray) -> dict[str, Any]:
    recs = g.records
    ar = attack_radii(g)
    digits = len(ar)
    correct_idx = {r["index"] for r in recs if r["prediction"] == r["label"]}
    # --minimize records carry the radius found under 'eps': not a budget, so they get
    # their own row (found / attacked, median W1) instead of a column per 'eps'
    minimal = [r for r in recs if r.get("mode") == "minimal"]
    fixed = [r for r in recs if r.get("mode") != "minimal"]
    per_eps = {}
    for eps in sorted({r["eps"] for r in fixed}):
        at = [r for r in fixed if r["eps"] == eps and r["prediction"] == r["label"]]
        k = sum(r["success"] for r in at)
        per_eps[float(eps)] = {
            "attacked": len(at),
            "success": k,
            "success_rate": k / len(at) if at else math.nan,
        }
    succ_w1 = [
        r["w1"] if not math.isnan(r["w1"]) else r["w1_bound"]
        for r in recs
        if r["success"] and r["prediction"] == r["label"]
    ]
    min_at = [r for r in minimal if r["prediction"] == r["label"]]
    min_w1 = [r["w1"] if not math.isnan(r["w1"]) else r["w1_bound"] for r in min_at if r["success"]]
    return {
        "kind": "attack",
        "label": g.label,
        "source": g.source,
        "method": g.method,
        "count": len(recs),
        "digits": digits,
        "clean_accuracy": len(correct_idx) / digits if digits else math.nan,
        "success_per_eps": per_eps,
        "minimal": {
            "attacked": len(min_at),
            "found": len(min_w1),
            "median_w1": _median(min_w1),
        },
        "median_w1_successful": _median(succ_w1),
        "median_attack_radius": _median([ar[i] for i in correct_idx]),
        "mean_seconds": _mean([r["seconds"] for r in recs]),
        "not_fooled": dict(
            zip(map(float, radii), map(float, not_fooled_fraction(g, radii)), strict=True)
        ),
    }


def _violates(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b) or math.isinf(b):
        return False
    return a > b + SANDWICH_ATOL + SANDWICH_RTOL * abs(b)


def sandwich(groups: Sequence[ResultGroup]) -> dict[int, dict[str, Any]]:
    """Join records by index: best certified bound, exact radius, attack radius per digit.

    Only correctly classified digits enter (misclassified ones have radius 0 everywhere).
    ``attack`` is the smallest W1 of a known adversarial: from attack records and from
    the ``upper`` field of certify records (the closest adversarial a complete method
    found before it stopped).

    Returns
    -------
    dict
        ``index -> {"cert": float, "cert_by": label, "exact": float, "attack": float,
        "per_group": {label: radius}}`` (nan where a kind is missing), for the indices
        present in at least two of the three kinds.
    """
    rows: dict[int, dict[str, Any]] = {}

    def row(i: int) -> dict[str, Any]:
        return rows.setdefault(
            i,
            {
                "cert": math.nan,
                "cert_by": None,
                "exact": math.nan,
                "attack": math.nan,
                "per_group": {},
                "wrong": False,
            },
        )

    for g in groups:
        if g.kind == "certify":
            for r in g.records:
                rr = row(r["index"])
                rad = _robust_radius(r)
                if rad < 0:
                    rr["wrong"] = rr["wrong"] or r["status"] == Status.MISCLASSIFIED.value
                    continue
                rr["per_group"][g.label] = rad
                up = r["upper"]
                if math.isfinite(up) and up > 0:  # the closest adversarial the certifier knows
                    rr["per_group"][g.label + UPPER_SUFFIX] = up
                    rr["attack"] = up if math.isnan(rr["attack"]) else min(rr["attack"], up)
                if r["exact"]:
                    rr["exact"] = rad if math.isnan(rr["exact"]) else min(rr["exact"], rad)
                elif math.isnan(rr["cert"]) or rad > rr["cert"]:
                    rr["cert"], rr["cert_by"] = rad, g.label
        else:
            for i, rad in attack_radii(g).items():
                rr = row(i)
                if rad == 0.0:
                    rr["wrong"] = True
                    continue
                rr["per_group"][g.label] = rad
                rr["attack"] = rad if math.isnan(rr["attack"]) else min(rr["attack"], rad)
    out = {}
    for i, rr in sorted(rows.items()):
        kinds = sum(not math.isnan(rr[k]) for k in ("cert", "exact", "attack"))
        if rr["wrong"] or kinds < 2:
            continue
        rr.pop("wrong")
        out[i] = rr
    return out


def _sandwich_summary(rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    checks = {
        "cert<=exact": ("cert", "exact"),
        "exact<=attack": ("exact", "attack"),
        "cert<=attack": ("cert", "attack"),
    }
    out: dict[str, Any] = {"digits": len(rows)}
    for name, (a, b) in checks.items():
        pairs = [
            (i, r[a], r[b])
            for i, r in rows.items()
            if not math.isnan(r[a]) and not math.isnan(r[b])
        ]
        bad = [i for i, va, vb in pairs if _violates(va, vb)]
        gaps = [vb / va for _, va, vb in pairs if va > 0 and math.isfinite(vb)]
        out[name] = {
            "compared": len(pairs),
            "violations": len(bad),
            "violating_indices": bad,
            "median_ratio": _median(gaps),
        }
    return out


def summarize(
    groups: Sequence[ResultGroup], *, radii: Sequence[float] = DEFAULT_RADII
) -> dict[str, Any]:
    """Numbers of the report, as plain data (also written as ``summary.json``).

    Returns
    -------
    dict
        ``{"radii": [...], "groups": [per-group dict], "sandwich": {...}}``; per certify
        group: ``count, status_counts, exact_count, clean_accuracy, certified_fraction,
        mean_radius, median_radius`` (over correctly classified digits, uncertified ones
        counting with their proven radius, often 0), ``mean_seconds,
        certified_accuracy {r: fraction}``; per attack group: ``count, digits,
        clean_accuracy, success_per_eps {eps: {attacked, success, success_rate}}``
        (among correctly classified digits), ``median_w1_successful,
        median_attack_radius`` (inf when most digits were not fooled), ``mean_seconds,
        not_fooled {r: fraction}``.  Radii in normalised W1.
    """
    radii_arr = _check_radii(radii)
    out = []
    for g in groups:
        out.append(
            _certify_summary(g, radii_arr) if g.kind == "certify" else _attack_summary(g, radii_arr)
        )
    return {
        "unit": "normalised W1 (mass 1 per channel, L1 ground cost, pixel step 1)",
        "radii": [float(r) for r in radii_arr],
        "groups": out,
        "sandwich": _sandwich_summary(sandwich(groups)),
    }


def _check_radii(radii: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(radii, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"radii: expected a list of numbers, got {radii!r}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"radii: expected non-negative finite radii, got {radii!r}")
    return np.unique(arr)
