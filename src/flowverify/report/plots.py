"""Figures of the report: accuracy curves, the per-digit sandwich, histograms, adversarials.

Plots use matplotlib (a dependency of flowverify); it is imported only when a plot
is drawn, through :class:`matplotlib.figure.Figure` (no pyplot, no global backend change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowverify.report.summary import (
    UPPER_SUFFIX,
    _robust_radius,
    attack_radii,
    certified_accuracy,
    not_fooled_fraction,
)
from flowverify.report.tables import _f

PLOT_FORMATS = ("png", "svg", "pdf")


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
