"""The ``flowverify report`` subcommand: tables and plots from certify/attack JSONL files.

Contract with :mod:`flowverify.cli`: :func:`add_parser` registers the subcommand on the
subparsers object and returns its parser; :func:`run` executes it and returns the exit
code.  Bad input raises ValueError / FileNotFoundError naming the argument (the main
program prints one line and exits with code 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flowverify.report.plots import PLOT_FORMATS, plots_available
from flowverify.report.summary import DEFAULT_RADII
from flowverify.report.writer import write_report

logger = logging.getLogger(__name__)

UNITS = (
    "Units: every radius and W1 distance in the report is normalised W1 (each image scaled "
    "to mass 1 per channel; L1 ground cost between pixel coordinates, one pixel step "
    "costs 1); raw W1 = image mass x normalised."
)

DESCRIPTION = (
    "Summarise certify and attack results. Reads JSONL files written by 'flowverify "
    "certify' / 'flowverify attack' (a file may hold several methods; records of different "
    "files are joined by their 'index') and writes DIR/summary.md, DIR/summary.json and "
    "figures: certified accuracy vs radius (one line per file and method; attack lines are "
    "the fraction of digits NOT fooled within r, an upper bound on robust accuracy), the "
    "per-digit sandwich certified <= exact <= attack, radius histograms and, with "
    "--adversarial, a grid of adversarial images. " + UNITS
)


def _radii(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"--radii: expected comma-separated non-negative numbers, got {text!r}"
        ) from None
    if not vals or any(not (v >= 0 and v < float("inf")) for v in vals):
        raise ValueError(f"--radii: expected comma-separated non-negative numbers, got {text!r}")
    return vals


def _formats(text: str) -> list[str]:
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in PLOT_FORMATS]
    if not vals or bad:
        raise ValueError(
            f"--format: expected comma-separated formats from {', '.join(PLOT_FORMATS)}, "
            f"got {text!r}"
        )
    return vals


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on an ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser(
        "report",
        help="summary tables and plots from certify/attack JSONL files",
        description=DESCRIPTION,
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="certify and/or attack JSONL files; one .npz among them is taken as --adversarial",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="flowverify-report",
        help="output folder, created if needed (default %(default)s)",
    )
    p.add_argument(
        "--adversarial",
        metavar="FILE.npz",
        help="adversarial images to draw: keys 'adversarial' (N,C,H,W), optional 'index' and "
        "'eps' (as written by 'flowverify attack')",
    )
    p.add_argument(
        "--images",
        metavar="PATH",
        help="the clean images the records' 'index' refers to (.npz, IDX, 'bundled', ...); "
        "drawn above the adversarial images",
    )
    p.add_argument(
        "--radii",
        default=",".join(f"{r:g}" for r in DEFAULT_RADII),
        help="radii (normalised W1) of the certified-accuracy table (default %(default)s)",
    )
    p.add_argument(
        "--note",
        help="a line for the top of summary.md and the figure titles, e.g. the data split "
        "('eval: last 2,000 of mnist10k.npz')",
    )
    p.add_argument(
        "--format",
        default="png,svg",
        help=f"figure formats, from {', '.join(PLOT_FORMATS)} (default %(default)s)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=32,
        help="at most this many adversarial images (default %(default)s)",
    )
    p.add_argument(
        "--no-plots",
        action="store_true",
        help="write summary.md and summary.json only (no figures)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``flowverify report``; returns the exit code (0)."""
    radii = _radii(args.radii)
    formats = _formats(args.format)
    if args.max_images < 1:
        raise ValueError(f"--max-images: expected a positive number, got {args.max_images}")
    files = [f for f in args.files if not str(f).lower().endswith(".npz")]
    npz = [f for f in args.files if str(f).lower().endswith(".npz")]
    if len(npz) > 1 or (npz and args.adversarial is not None):
        raise ValueError(
            f"FILE: at most one adversarial .npz (or --adversarial), got {', '.join(npz)}"
        )
    if npz:
        args.adversarial = npz[0]
    if not files:
        raise ValueError("FILE: expected at least one certify or attack JSONL file")
    args.files = files
    if args.images is not None and args.adversarial is None:
        raise ValueError("--images: only used together with --adversarial")
    for flag, paths in (("FILE", files), ("--adversarial", [args.adversarial])):
        for f in paths:
            if f is not None and not os.path.isfile(f):
                what = "is a folder" if os.path.isdir(f) else "does not exist"
                raise ValueError(f"{flag}: {str(f)!r} {what}; expected a file")
    if args.out and os.path.isfile(args.out):
        raise ValueError(f"--out: {str(args.out)!r} is a file; expected a folder")
    plots = not args.no_plots
    if plots and not plots_available():  # matplotlib is a dependency: a broken install
        print(
            "flowverify report: note: matplotlib cannot be imported here; writing the tables "
            "without plots (pip install matplotlib for the figures)",
            file=sys.stderr,
        )
        plots = False
    paths = write_report(
        args.files,
        args.out,
        adversarial=args.adversarial,
        images=args.images,
        radii=radii,
        plots=plots,
        formats=formats,
        max_images=args.max_images,
        note=args.note,
    )
    print(f"wrote {len(paths)} files into {args.out}: " + ", ".join(sorted(paths)))
    return 0
