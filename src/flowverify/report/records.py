"""Reading the report's inputs: certify/attack JSONL records, grouped per file and method.

Record kinds (one JSON object per line, named by its ``kind`` field; ``"inf"``/``"nan"``
strings are numbers; every record has a ``status`` of :class:`~flowverify.core.results.Status`):

* *certify*: ``index, label, prediction, method, certifier, status, radius`` (normalised
  W1), ``radius_raw, exact, seconds, ...``.  ``radius`` is a proven lower bound on the
  distance to the closest image of another class (the exact distance when ``exact``);
  it is ignored for ``misclassified`` and ``error`` records.
* *attack*: ``index, label, prediction, eps, success, w1`` (exact normalised W1 between
  the adversarial and the clean image), ``w1_bound, prediction_adversarial, seconds``.

The files are those written by ``flowverify certify`` / ``flowverify attack`` (and by
:func:`~flowverify.baselines.smoothing.smoothed_certify` via ``to_dict``).  The ``.npz``
of adversarial images drawn by the report is read here as well.
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

from flowverify.core.results import Status

logger = logging.getLogger(__name__)

_STATUSES = tuple(s.value for s in Status)


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
    """``certify`` (also smoothing records) or ``attack``, from the record's ``kind``
    (older files without one: from its keys)."""
    kind = rec.get("kind")
    if kind in ("certify", "smoothing"):
        return "certify"
    if kind == "attack":
        return "attack"
    if kind is not None:
        return None
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
