"""Text output of the report: the summary as a markdown document and as JSON-ready data."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowverify.report.records import _STATUSES
from flowverify.report.summary import SANDWICH_ATOL, SANDWICH_RTOL


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


def _json_keys(obj: Any) -> Any:
    """Float dict keys (radii, eps) as repr strings for JSON."""
    if isinstance(obj, Mapping):
        return {(repr(k) if isinstance(k, float) else k): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj]
    return obj
