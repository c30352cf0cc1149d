"""The report's entry point: :func:`write_report` turns JSONL results into files.

It reads the inputs (:mod:`~flowverify.report.records`), computes the numbers
(:mod:`~flowverify.report.summary`), writes ``summary.md`` and ``summary.json``
(:mod:`~flowverify.report.tables`) and draws the figures (:mod:`~flowverify.report.plots`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flowverify.core.results import jsonable
from flowverify.report.plots import (
    PLOT_FORMATS,
    _figure_class,
    _plot_adversarials,
    _plot_curves,
    _plot_histograms,
    _plot_sandwich,
)
from flowverify.report.records import _load_adversarial, load_results
from flowverify.report.summary import DEFAULT_RADII, _check_radii, sandwich, summarize
from flowverify.report.tables import _json_keys, _markdown

logger = logging.getLogger(__name__)


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
        Certify and/or attack JSONL files (record kinds: :mod:`~flowverify.report.records`).
    out_dir : path-like
        Output folder (created).
    adversarial : path-like, optional
        An ``.npz`` of adversarial images: ``adversarial (N, C, H, W)`` and optionally
        ``index (N,)``, ``eps (N,)``; drawn as a grid (``adversarials.*``).
    images : path-like, optional
        The clean images the records' ``index`` refers to (any
        :func:`flowverify.io.load_images` source); drawn above the adversarials.
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
        from flowverify.io.images import load_images

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
