r"""Reports on certification and attack results: summary tables and plots.

Reads the JSONL files written by ``flowverify certify`` / ``flowverify attack`` (and by
:func:`~flowverify.baselines.smoothing.smoothed_certify` via ``to_dict``), groups the
records per file and method, and writes ``summary.md`` (plus ``summary.json``) and figures.

Record kinds (one JSON object per line; ``"inf"``/``"nan"`` strings are numbers):

* *certify*: ``index, label, prediction, method, certifier, status, radius`` (normalised
  W1), ``radius_raw, exact, seconds, ...``.  ``radius`` is a proven lower bound on the
  distance to the closest image of another class (the exact distance when ``exact``);
  it is ignored for ``misclassified`` and ``error`` records.
* *attack*: ``index, label, prediction, eps, success, w1`` (exact normalised W1 between
  the adversarial and the clean image), ``w1_bound, prediction_adversarial, seconds``.

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

Plots use matplotlib (a dependency of flowverify); it is imported only when a plot
is drawn, through :class:`matplotlib.figure.Figure` (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowverify.core.results import Status, jsonable

__all__ = [
    "DEFAULT_RADII",
    "ResultGroup",
    "attack_radii",
    "certified_accuracy",
    "load_results",
    "not_fooled_fraction",
    "sandwich",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Radii (normalised W1) at which the summary tabulates certified accuracy.
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: Tolerances of the sandwich check ``a <= b``: a violation is ``a > b + atol + rtol*|b|``.
SANDWICH_RTOL = 1e-6
SANDWICH_ATOL = 1e-9

_STATUSES = tuple(s.value for s in Status)
UPPER_SUFFIX = " (upper)"
_NOT_ROBUST = (Status.MISCLASSIFIED.value, Status.ERROR.value)
PLOT_FORMATS = ("png", "svg", "pdf")


# --------------------------------------------------------------------------- loading


def _num(value: Any, what: str) -> float:
    """A JSON number, ``None`` or one of the strings inf/-inf/nan as a float."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(value.strip().lower())
    raise ValueError(f"{what}: expected a number, got {value!r}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    return int(value)


def _kind(rec: Mapping[str, Any]) -> str | None:
    if "status" in rec and "radius" in rec:
        return "certify"
    if "eps" in rec and "success" in rec:
        return "attack"
    return None


def _clean_certify(rec: dict[str, Any], where: str) -> dict[str, Any]:
    status = rec.get("status")
    if status not in _STATUSES:
        raise ValueError(f"{where}: unknown status {status!r}; expected one of {_STATUSES}")
    out = dict(rec)
    out["index"] = _int(rec.get("index"), f"{where}: 'index'")
    out["label"] = _int(rec.get("label"), f"{where}: 'label'")
    pred = rec.get("prediction")
    out["prediction"] = -1 if pred is None else _int(pred, f"{where}: 'prediction'")
    out["radius"] = _num(rec.get("radius"), f"{where}: 'radius'")
    out["seconds"] = _num(rec.get("seconds"), f"{where}: 'seconds'")
    out["exact"] = bool(rec.get("exact", False))
    out["upper"] = _num(rec.get("upper"), f"{where}: 'upper'")
    out["method"] = str(rec.get("method") or "certify")
    out["certifier"] = str(rec.get("certifier") or "")
    return out


def _clean_attack(rec: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(rec)
    out["index"] = _int(rec.get("index"), f"{where}: 'index'")
    out["label"] = _int(rec.get("label"), f"{where}: 'label'")
    out["prediction"] = _int(rec.get("prediction"), f"{where}: 'prediction'")
    out["eps"] = _num(rec.get("eps"), f"{where}: 'eps'")
    if not isinstance(rec.get("success"), bool):
        raise ValueError(f"{where}: 'success': expected true or false, got {rec.get('success')!r}")
    out["w1"] = _num(rec.get("w1"), f"{where}: 'w1'")
    out["w1_bound"] = _num(rec.get("w1_bound"), f"{where}: 'w1_bound'")
    out["seconds"] = _num(rec.get("seconds"), f"{where}: 'seconds'")
    pa = rec.get("prediction_adversarial")
    out["prediction_adversarial"] = None if pa is None else _int(pa, f"{where}: adv. prediction")
    return out


def _read_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    try:
        return _read_lines_utf8(path, out)
    except UnicodeDecodeError:
        raise ValueError(
            f"files: {str(path)!r} is not a text JSONL file (not UTF-8); expected the output "
            "of flowverify certify/attack"
        ) from None


def _read_lines_utf8(path: Path, out: list) -> list[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith("\n"):
                logger.warning("%s: ignoring an incomplete last line %d", path, lineno)
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"files: {str(path)!r} line {lineno}: invalid JSON ({exc})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"files: {str(path)!r} line {lineno}: expected a JSON object, got "
                    f"{type(obj).__name__}"
                )
            out.append((lineno, obj))
    return out


@dataclass
class ResultGroup:
    """The records of one file and one method.

    Attributes
    ----------
    kind : {"certify", "attack"}
    label : str
        ``"<file name> [<method>]"`` (certify) or ``"<file name> [attack]"``.
    source : str
        The file.
    method : str
        ``method`` (plus ``/certifier`` when given) of certify records; ``"attack"``.
    records : list of dict
        Parsed records (numbers as floats, non-finite strings converted); certify: one per
        index (the last wins), attack: one per ``(index, eps)``.
    """

    kind: str
    label: str
    source: str
    method: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def indices(self) -> np.ndarray:
        return np.array(sorted({r["index"] for r in self.records}), dtype=np.int64)


def _dedupe(records: list[dict[str, Any]], key, where: str) -> list[dict[str, Any]]:
    seen: dict[Any, dict[str, Any]] = {}
    for r in records:
        seen[key(r)] = r
    if len(seen) < len(records):
        logger.warning(
            "%s: %d duplicate records (same key); keeping the last of each",
            where,
            len(records) - len(seen),
        )
    return list(seen.values())


def load_results(files: Sequence[str | os.PathLike]) -> list[ResultGroup]:
    """Read certify/attack JSONL files into groups (one per file and method).

    Parameters
    ----------
    files : sequence of path-like
        JSONL files; each line a certify or an attack record (a file may mix them).

    Returns
    -------
    list of ResultGroup
        Certify groups (per file and ``method``/``certifier``) and attack groups (per
        file), in file order.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    ValueError
        Naming the file and line, for invalid JSON, a record that is neither kind, a
        missing or ill-typed field, or a file without records.
    """
    if isinstance(files, (str, os.PathLike)) or not isinstance(files, Iterable):
        raise TypeError("files: expected a sequence of paths")
    files = list(files)
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"files: expected paths, got {f!r} ({type(f).__name__})")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("files: expected at least one JSONL file")
    names = [f.name for f in files]
    groups: list[ResultGroup] = []
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"files: no such file: {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"files: {str(path)!r} is a folder, expected a JSONL file")
        shown = path.name if names.count(path.name) == 1 else str(path)
        lines = _read_lines(path)
        if not lines:
            raise ValueError(f"files: {str(path)!r} holds no records")
        certify: dict[str, list[dict[str, Any]]] = {}
        attack: list[dict[str, Any]] = []
        for lineno, rec in lines:
            where = f"files: {str(path)!r} line {lineno}"
            kind = _kind(rec)
            if kind == "certify":
                r = _clean_certify(rec, where)
                name = r["method"] + (f"/{r['certifier']}" if r["certifier"] else "")
                certify.setdefault(name, []).append(r)
            elif kind == "attack":
                attack.append(_clean_attack(rec, where))
            else:
                raise ValueError(
                    f"{where}: neither a certify record ('status' and 'radius') nor an "
                    f"attack record ('eps' and 'success'); keys: {sorted(rec)[:12]}"
                )
        for name, recs in certify.items():
            recs = _dedupe(recs, lambda r: r["index"], f"{path} [{name}]")
            groups.append(ResultGroup("certify", f"{shown} [{name}]", str(path), name, recs))
        if attack:
            recs = _dedupe(attack, lambda r: (r["index"], r["eps"]), f"{path} [attack]")
            groups.append(ResultGroup("attack", f"{shown} [attack]", str(path), "attack", recs))
    return groups


# --------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- markdown


def _f(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    v = float(v)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _markdown(
    summary: Mapping[str, Any],
    *,
    files: Sequence[str],
    note: str | None,
    figures: Mapping[str, Path],
    adversarial: str | None,
) -> str:
    radii = summary["radii"]
    cert = [g for g in summary["groups"] if g["kind"] == "certify"]
    att = [g for g in summary["groups"] if g["kind"] == "attack"]
    md = ["# flowverify report", ""]
    if note:
        md += [note, ""]
    md += [
        "Units: all radii and W1 distances are **normalised** W1 (each image scaled to mass 1 "
        "per channel; L1 ground cost, one pixel step costs 1); raw W1 = mass × normalised.",
        "",
        "Inputs: "
        + ", ".join(f"`{f}`" for f in files)
        + (f"; adversarial images: `{adversarial}`" if adversarial else ""),
        "",
    ]
    if cert:
        md += ["## Certification", ""]
        header = [
            "source [method]",
            "n",
            *_STATUSES,
            "exact",
            "clean acc.",
            "certified fraction",
            "mean radius",
            "median radius",
            "mean s",
        ]
        rows = []
        for g in cert:
            sc = g["status_counts"]
            rows.append(
                [
                    g["label"],
                    g["count"],
                    *(sc[s] for s in _STATUSES),
                    g["exact_count"],
                    _f(g["clean_accuracy"], ".3f"),
                    _f(g["certified_fraction"], ".3f"),
                    _f(g["mean_radius"]),
                    _f(g["median_radius"]),
                    _f(g["mean_seconds"], ".3g"),
                ]
            )
        md += _table(header, rows)
        md += [
            "",
            "Status columns: number of records with that status. *certified fraction*: "
            "fraction with status `certified`; mean/median radius over the "
            "correctly classified digits (uncertified ones with their proven radius, "
            "often 0).",
            "",
        ]
    if cert or att:
        md += [
            "## Certified accuracy at radius r",
            "",
            "Fraction of digits proven robust at r (certify rows) and fraction NOT fooled "
            "within r (attack rows, an upper bound on robust accuracy).",
            "",
        ]
        header = ["source", *(f"r={_f(r)}" for r in radii)]
        rows = [[g["label"], *(_f(g["certified_accuracy"][r], ".3f") for r in radii)] for g in cert]
        rows += [
            [g["label"] + " (upper bound)", *(_f(g["not_fooled"][r], ".3f") for r in radii)]
            for g in att
        ]
        md += _table(header, rows) + [""]
    if att:
        md += ["## Attacks", ""]
        header = [
            "source",
            "digits",
            "records",
            "clean acc.",
            "median W1 (successful)",
            "median attack radius",
            "mean s",
        ]
        rows = [
            [
                g["label"],
                g["digits"],
                g["count"],
                _f(g["clean_accuracy"], ".3f"),
                _f(g["median_w1_successful"]),
                _f(g["median_attack_radius"]),
                _f(g["mean_seconds"], ".3g"),
            ]
            for g in att
        ]
        md += _table(header, rows) + [""]
        all_eps = sorted({e for g in att for e in g["success_per_eps"]})
        fixed_groups = [g for g in att if g["success_per_eps"]]
        if fixed_groups:
            md += [
                "Success rate per budget eps (among correctly classified digits: fooled / "
                "attacked):",
                "",
            ]
        header = ["source", *(f"eps={_f(e)}" for e in all_eps)]
        rows = []
        for g in fixed_groups:
            cells = []
            for e in all_eps:
                s = g["success_per_eps"].get(e)
                cells.append(
                    "–"
                    if s is None
                    else f"{s['success']}/{s['attacked']} ({_f(s['success_rate'], '.3f')})"
                )
            rows.append([g["label"], *cells])
        if fixed_groups:
            md += _table(header, rows) + [""]
        min_groups = [g for g in att if g.get("minimal", {}).get("attacked")]
        if min_groups:
            md += [
                "Minimal-radius attacks (`--minimize`: each record's W1 is the radius found, "
                "not a budget):",
                "",
            ]
            rows = [
                [
                    g["label"],
                    f"{g['minimal']['found']}/{g['minimal']['attacked']}",
                    _f(g["minimal"]["median_w1"]),
                ]
                for g in min_groups
            ]
            md += _table(["source", "found / attacked", "median W1 found"], rows) + [""]
    sw = summary["sandwich"]
    if sw["digits"]:
        md += ["## Sandwich: certified ≤ exact ≤ attack (per digit, joined by index)", ""]
        rows = []
        for name in ("cert<=exact", "exact<=attack", "cert<=attack"):
            s = sw[name]
            shown = ", ".join(map(str, s["violating_indices"][:10]))
            more = " …" if len(s["violating_indices"]) > 10 else ""
            rows.append(
                [
                    name,
                    s["compared"],
                    s["violations"],
                    _f(s["median_ratio"], ".3g"),
                    (shown + more) or "–",
                ]
            )
        md += _table(
            ["check", "digits compared", "violations", "median b/a", "violating indices"], rows
        )
        md += [
            "",
            f"Tolerance: a ≤ b fails if a > b + {SANDWICH_ATOL:g} + {SANDWICH_RTOL:g}·|b|. "
            "Certified = best lower bound over the non-exact certify records.",
            "",
        ]
    if figures:
        md += ["## Figures", ""]
        for path in figures.values():
            if path.suffix == ".png":
                md += [f"![{path.stem}]({path.name})", ""]
    return "\n".join(md).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the report's plots need matplotlib (a dependency of flowverify): pip install "
            "matplotlib (or write "
            "the summary only, plots=False / --no-plots)"
        ) from exc
    return Figure


def plots_available() -> bool:
    """Whether matplotlib can be imported (the ``plot`` extra)."""
    try:
        _figure_class()
    except ImportError:
        return False
    return True


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> dict[str, Path]:
    import matplotlib

    paths = {}
    with matplotlib.rc_context({"svg.hashsalt": "flowverify", "svg.fonttype": "none"}):
        for fmt in formats:
            p = out_dir / f"{stem}.{fmt}"
            meta = {"Date": None} if fmt in ("svg", "pdf") else {"Software": None}
            fig.savefig(p, format=fmt, dpi=120, bbox_inches="tight", metadata=meta)
            paths[f"{stem}.{fmt}"] = p
    return paths


def _plot_curves(groups, out_dir, formats, title_note):
    Figure = _figure_class()
    cert = [g for g in groups if g.kind == "certify"]
    att = [g for g in groups if g.kind == "attack"]
    finite = [
        v
        for g in cert
        for v in (_robust_radius(r) for r in g.records)
        if v > 0 and math.isfinite(v)
    ]
    finite += [v for g in att for v in attack_radii(g).values() if v > 0 and math.isfinite(v)]
    rmax = 1.05 * max(finite) if finite else 1.0
    grid = np.linspace(0.0, rmax, 600)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for g, c in zip(groups, colours, strict=True):
        if g.kind == "certify":
            ax.plot(
                grid, certified_accuracy(g, grid), color=c, lw=1.8, label=f"{g.label} (certified)"
            )
        else:
            ax.plot(
                grid,
                not_fooled_fraction(g, grid),
                color=c,
                lw=1.5,
                ls="--",
                label=f"{g.label} (not fooled: upper bound)",
            )
    ax.set_xlim(0, rmax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("radius r (normalised W1, L1 ground cost, pixel step = 1)")
    ax.set_ylabel("fraction of digits")
    ax.set_title(
        "Certified accuracy vs radius" + (f"\n{title_note}" if title_note else ""), fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out_dir, "certified_accuracy", formats)


def sandwich_ticks(indices: Sequence[int], max_ticks: int = 40) -> tuple[list[int], list[str]]:
    """Tick positions and labels of the sandwich plot: the digits' indices.

    Parameters
    ----------
    indices : sequence of int
        The digits' indices in plotting order (position ``k`` shows ``indices[k]``).
    max_ticks : int
        At most this many ticks, evenly spread (first and last included).

    Returns
    -------
    positions, labels : list of int, list of str
    """
    n = len(indices)
    if n == 0:
        return [], []
    pos = sorted(set(np.linspace(0, n - 1, min(n, max_ticks)).round().astype(int).tolist()))
    return pos, [str(int(indices[k])) for k in pos]


def _plot_sandwich(groups, rows, out_dir, formats, title_note):
    Figure = _figure_class()
    idx = list(rows)

    def key(i):
        r = rows[i]
        for k in ("exact", "attack", "cert"):
            if not math.isnan(r[k]) and math.isfinite(r[k]):
                return r[k]
        return math.inf

    idx.sort(key=key)
    x = np.arange(len(idx))
    fig = Figure(figsize=(max(6, min(14, 0.12 * len(idx) + 4)), 4.5))
    ax = fig.add_subplot()
    markers = {"certify": "v", "attack": "^"}
    for n, g in enumerate(groups):
        ys = np.array([rows[i]["per_group"].get(g.label, np.nan) for i in idx], dtype=float)
        if np.isnan(ys).all():
            continue
        exact = g.kind == "certify" and any(r["exact"] for r in g.records)
        ax.plot(
            x,
            np.where(np.isinf(ys), np.nan, ys),
            ls="none",
            marker="o" if exact else markers[g.kind],
            ms=4,
            color=f"C{n % 10}",
            label=g.label + (" (exact)" if exact else ""),
        )
        if g.kind == "certify":
            up = [rows[i]["per_group"].get(g.label + UPPER_SUFFIX, np.nan) for i in idx]
            if not np.isnan(up).all():
                ax.plot(
                    x,
                    up,
                    ls="none",
                    marker="x",
                    ms=4,
                    color=f"C{n % 10}",
                    label=g.label + " (closest adversarial found)",
                )
    pos, labels = sandwich_ticks(idx)
    ax.set_xticks(pos, labels, rotation=90 if len(pos) > 10 else 0, fontsize=7)
    ax.set_xlabel(
        "digit index (sorted by exact, else attack radius; never-fooled attacks not drawn)"
    )
    ax.set_ylabel("radius (normalised W1)")
    ax.set_title(
        "Per digit: certified ≤ exact ≤ attack" + (f"\n{title_note}" if title_note else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "sandwich", formats)


def _plot_histograms(groups, out_dir, formats, title_note):
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator

    data = []
    for g in groups:
        if g.kind == "certify":
            vals = [v for v in map(_robust_radius, g.records) if v > 0]
            exact = all(r["exact"] for r in g.records)
            what = "exact radius" if exact else "proven radius > 0"
        else:
            vals = [v for v in attack_radii(g).values() if v > 0]
            what = "attack W1"
        vals = [v for v in vals if math.isfinite(v)]
        data.append((g, what, vals))
    allv = [v for _, _, vals in data for v in vals]
    bins = np.linspace(0, max(allv) if allv and max(allv) > 0 else 1.0, 31)
    fig = Figure(figsize=(7, 1.9 * len(data) + 0.8))
    axes = fig.subplots(len(data), 1, sharex=True, squeeze=False)[:, 0]
    for n, (ax, (g, what, vals)) in enumerate(zip(axes, data, strict=True)):
        ax.hist(vals, bins=bins, color=f"C{n % 10}", alpha=0.8)
        ax.set_title(f"{g.label}: {what} (n={len(vals)})", fontsize=8)
        ax.set_ylabel("digits")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("radius (normalised W1)")
    if title_note:
        fig.suptitle(title_note, fontsize=9)
    return _save(fig, out_dir, "radius_histograms", formats)


def _load_adversarial(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"adversarial: no such file: {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"adversarial: cannot read {str(path)!r} as .npz ({exc})") from None
    if "adversarial" not in data:
        raise ValueError(
            f"adversarial: {str(path)!r} has no key 'adversarial' (keys: {sorted(data)})"
        )
    adv = np.asarray(data["adversarial"], dtype=np.float64)
    if adv.ndim == 3:
        adv = adv[:, None]
    if adv.ndim != 4 or adv.shape[0] == 0:
        raise ValueError(
            "adversarial: expected 'adversarial' of shape (N, C, H, W), got "
            f"{data['adversarial'].shape}"
        )
    n = adv.shape[0]
    out = {"adversarial": adv}
    for key in ("index", "eps"):
        if key in data:
            v = np.asarray(data[key]).reshape(-1)
            if v.shape != (n,):
                raise ValueError(
                    f"adversarial: key {key!r} has shape {data[key].shape}, expected ({n},)"
                )
            out[key] = v
    return out


def _as_display(img: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """``(C, H, W)`` -> an array imshow can show, and its keyword arguments."""
    if img.shape[0] == 3:
        hi = max(float(img.max()), 1e-12)
        return np.clip(img.transpose(1, 2, 0) / hi, 0, 1), {}
    g = img.mean(axis=0)
    return g, {
        "cmap": "gray_r",
        "vmin": min(0.0, float(g.min())),
        "vmax": max(float(g.max()), 1e-12),
    }


def _plot_adversarials(adv, groups, clean, out_dir, formats, max_images, title_note):
    Figure = _figure_class()
    images = adv["adversarial"]
    n = min(images.shape[0], max_images)
    index = adv.get("index")
    eps = adv.get("eps")
    lookup = {}
    for g in groups:
        if g.kind == "attack":
            for r in g.records:
                lookup[(r["index"], r["eps"])] = r
    ncols = min(8, n)
    nblocks = math.ceil(n / ncols)
    per = 2 if clean is not None else 1
    fig = Figure(figsize=(1.5 * ncols, 1.75 * nblocks * per + 0.4))
    axes = fig.subplots(nblocks * per, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(n):
        b, c = divmod(k, ncols)
        title = f"#{int(index[k])}" if index is not None else f"[{k}]"
        if eps is not None:
            title += f" ε={float(eps[k]):.3g}"
        rec = None
        if index is not None and eps is not None:
            rec = lookup.get((int(index[k]), float(eps[k])))
        if rec is not None:
            pa = rec.get("prediction_adversarial")
            w = rec["w1"] if not math.isnan(rec["w1"]) else rec["w1_bound"]
            title += f"\n{rec['label']}→{pa if pa is not None else '?'} W1={_f(w, '.3g')}"
        if clean is not None:
            ax = axes[b * per, c]
            i = int(index[k])
            if 0 <= i < clean.shape[0]:
                arr, kw = _as_display(clean[i])
                ax.imshow(arr, **kw)
            ax.set_title(f"clean #{i}", fontsize=7)
        ax = axes[b * per + per - 1, c]
        arr, kw = _as_display(images[k])
        ax.imshow(arr, **kw)
        ax.set_title(title, fontsize=7)
    fig.suptitle("Adversarial images" + (f" — {title_note}" if title_note else ""), fontsize=9)
    return _save(fig, out_dir, "adversarials", formats)


# --------------------------------------------------------------------------- entry point


def write_report(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    adversarial: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    plots: bool = True,
    formats: Sequence[str] = ("png", "svg"),
    max_images: int = 32,
    note: str | None = None,
) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.json`` and figures for certify/attack JSONL files.

    Parameters
    ----------
    files : sequence of path-like
        Certify and/or attack JSONL files (see the module docstring).
    out_dir : path-like
        Output folder (created).
    adversarial : path-like, optional
        An ``.npz`` of adversarial images: ``adversarial (N, C, H, W)`` and optionally
        ``index (N,)``, ``eps (N,)``; drawn as a grid (``adversarials.*``).
    images : path-like, optional
        The clean images the records' ``index`` refers to (any
        :func:`flowverify.io.datasets.load_images` source); drawn above the adversarials.
    radii : sequence of float
        Radii (normalised W1) of the certified-accuracy table.
    plots : bool
        Draw figures (needs matplotlib); False writes the summaries only.
    formats : sequence of {"png", "svg", "pdf"}
        Figure formats.
    max_images : int
        At most this many adversarial images in the grid.
    note : str, optional
        A line put at the top of the summary and in figure titles (e.g. the data split).

    Returns
    -------
    dict
        Artefact name (``summary.md``, ``certified_accuracy.png``, ...) -> path.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the argument, for missing or malformed inputs.
    ImportError
        If ``plots`` and matplotlib cannot be imported.
    """
    if isinstance(formats, str):
        fmts = [formats]
    elif isinstance(formats, (bytes, Mapping)) or not isinstance(formats, Iterable):
        raise ValueError(f"formats: expected some of {PLOT_FORMATS}, got {formats!r}")
    else:
        fmts = list(formats)
    bad = [f for f in fmts if not isinstance(f, str) or f not in PLOT_FORMATS]
    if bad or not fmts:
        raise ValueError(f"formats: expected some of {PLOT_FORMATS}, got {formats!r}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images: expected a positive int, got {max_images!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    if str(out_dir) == "":
        raise ValueError("out_dir: expected a folder path, got an empty string")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir: {str(out_dir)!r} exists and is not a folder")
    for name, value in (("adversarial", adversarial), ("images", images)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a path or None, got {type(value).__name__}")
    if note is not None and not isinstance(note, str):
        raise TypeError(f"note: expected a string or None, got {type(note).__name__}")
    if not isinstance(plots, (bool, np.bool_)):
        raise TypeError(f"plots: expected True or False, got {plots!r}")
    _check_radii(radii)
    if plots:
        _figure_class()  # fail before writing anything
    groups = load_results(files)
    adv = _load_adversarial(Path(adversarial)) if adversarial is not None else None
    clean = None
    if images is not None:
        from flowverify.io.datasets import load_images

        if adv is None:
            raise ValueError("images: only used with adversarial (the clean side of the grid)")
        if "index" not in adv:
            raise ValueError("images: the adversarial .npz has no 'index' to look the images up")
        clean, _ = load_images(images)
        clean = np.asarray(clean, dtype=np.float64)
    summary = summarize(groups, radii=radii)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    if plots:
        figures.update(_plot_curves(groups, out, fmts, note))
        rows = sandwich(groups)
        if rows:
            figures.update(_plot_sandwich(groups, rows, out, fmts, note))
        figures.update(_plot_histograms(groups, out, fmts, note))
        if adv is not None:
            figures.update(_plot_adversarials(adv, groups, clean, out, fmts, max_images, note))
    md = _markdown(
        summary,
        files=[str(f) for f in files],
        note=note,
        figures=figures,
        adversarial=None if adversarial is None else str(adversarial),
    )
    paths = {"summary.md": out / "summary.md", "summary.json": out / "summary.json"}
    paths["summary.md"].write_text(md, encoding="utf-8")
    paths["summary.json"].write_text(
        json.dumps(jsonable(_json_keys(summary)), indent=1, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    paths.update(figures)
    logger.info("report: wrote %d files into %s", len(paths), out)
    return paths


def _json_keys(obj: Any) -> Any:
    """Float dict keys (radii, eps) as repr strings for JSON."""
    if isinstance(obj, Mapping):
        return {(repr(k) if isinstance(k, float) else k): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj]
    return obj
