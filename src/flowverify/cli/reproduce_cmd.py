"""The ``flowverify reproduce`` subcommand: re-run the paper's experimental claims.

Wired by :mod:`flowverify.cli.app`: :func:`add_parser` adds the subcommand and returns
its parser, :func:`run` runs it and returns the exit code.  A bad argument raises
ValueError or FileNotFoundError naming it, which the main program reports on one line
with exit code 2.
"""

from __future__ import annotations

import argparse
import logging

from flowverify.paper.run import CLAIMS, SETTINGS

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Re-run an experiment of the paper with the defaults of docs/REPRODUCTION.md and write "
    "OUT/CLAIM/CLAIM.md (tables), OUT/CLAIM/CLAIM.json and figures. Claims: fig1 (reference "
    "fine-tuning, Fig. 1), fig2 (adversarial examples of both attacks, Fig. 2), attack "
    "(size and time against Wong et al.'s attack), linear (Lemmas 7 and 8, Fig. 4), "
    "smoothing (against Levine & Feizi's Wasserstein smoothing), all (one after the other). "
    "Each full claim runs in under 30 minutes on 2 CPU cores; --quick is a smoke test on a "
    "few digits (not the claim). Wong et al.'s attack needs adversarial-robustness-toolbox "
    "(without it, fig2/attack show ours only). Radii and W1 are normalised (images scaled "
    "to mass 1; L1 ground cost between pixel coordinates)."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reproduce`` on an ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser(
        "reproduce",
        help="re-run the paper's experiments (fig1, fig2, attack, linear, smoothing, all)",
        description=DESCRIPTION,
    )
    p.add_argument("claim", choices=[*CLAIMS, "all"], help="the claim to reproduce")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: a few digits, few smoothing samples (seconds, not the claim)",
    )
    p.add_argument(
        "--out", metavar="DIR", default="results", help="output folder (default %(default)s)"
    )
    p.add_argument(
        "--n",
        type=int,
        metavar="N",
        help="evaluation digits (fig2: digits shown) instead of the claim's default ("
        + ", ".join(f"{c} {SETTINGS[c]['n']}" for c in CLAIMS)
        + ")",
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help="mnist10k.npz (train: first 8,000, evaluation: last 2,000); default: the "
        "file named by $FLOWVERIFY_DATA, else shared/data/mnist10k.npz or "
        "../shared/data/mnist10k.npz under the current folder, else ../shared/data next to "
        "a source checkout. Without it a full claim fails; --quick then uses the bundled "
        "digits (and says so)",
    )
    p.add_argument(
        "--smoothing-models",
        metavar="DIR",
        default="results/smoothing_models",
        help="smoothed base nets smoothing_sigma<σ>.pt (scripts/train_smoothing.py); "
        "missing ones are trained and saved there (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``flowverify reproduce``; returns the exit code (0)."""
    from flowverify.paper.common import DATA_ENV, find_data
    from flowverify.paper.run import reproduce

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n: expected a positive number of digits, got {args.n}")
    if args.threads < 1:
        raise ValueError(f"--threads: expected a positive number, got {args.threads}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative seed, got {args.seed}")
    try:
        path, looked = find_data(args.data)
    except FileNotFoundError as exc:
        msg = str(exc)
        raise FileNotFoundError("--" + msg if msg.startswith("data:") else msg) from None
    if path is None and not args.quick:
        raise ValueError(
            f"--data: mnist10k.npz not found (looked at {', '.join(looked)}); pass --data PATH "
            f"or set {DATA_ENV} (the bundled digits stand in for --quick smoke tests only)"
        )
    results = reproduce(
        args.claim,
        out=args.out,
        quick=args.quick,
        n=args.n,
        data=args.data,
        smoothing_models=args.smoothing_models,
        seed=args.seed,
        threads=args.threads,
    )
    for res in results:
        files = ", ".join(sorted(res.files.values()))
        mode = " (quick smoke test)" if args.quick else ""
        print(f"{res.claim}{mode}: {res.seconds:.1f} s; data: {res.settings.get('data')}")
        print(f"  wrote {files}")
    return 0
