"""The ``flowverify certify`` subcommand: certified and exact W1 radii, one JSON per image.

Wiring (``flowverify.cli``): :func:`add_parser` adds the subcommand to the subparsers,
:func:`run` executes it and returns the exit code.  Bad input raises ``ValueError``,
``TypeError`` or ``FileNotFoundError`` naming the argument; the main CLI turns them into
one line on stderr and exit code 2.

Output: one JSON object per image (see :class:`flowverify.certify.CertifyResult`), each
with the resolved configuration under ``"config"``; with ``--witness-dir DIR``, every
result that carries an adversarial image (exact results, falsified decisions) writes it
to ``DIR/<index>.npy`` (float64, the input's shape and mass).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

logger = logging.getLogger(__name__)

_UNITS = (
    "Units: 'radius' is the normalised W1 radius (images scaled to mass 1 per channel, the "
    "paper's unit); 'radius_raw' is in data units (pixels as loaded, W1 between the images "
    "as given: raw = mass x normalised). Ground cost: L1 distance between pixel "
    "coordinates (one pixel step costs 1)."
)

_DESCRIPTION = (
    "Certify a classifier against Wasserstein (W1) perturbations. For each image, the "
    "largest W1 radius within which the class provably stays the same. Methods (the "
    "paper's Table 1): 'vanilla' (L1 ball in the flow domain, Theorem 3), 'feasible' "
    "(the ball intersected with the feasibility polytope R + A flow >= 0, Theorem 6; never "
    "below vanilla), 'complete' (the exact radius and the closest adversarial image), "
    "'complete-ball' (exact radius of the L1 ball, a lower bound of the W1 radius). "
    "Incomplete radii come from a search to relative tolerance --rtol; --eps decides one "
    "radius instead (certified / falsified / unknown). " + _UNITS
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``certify`` subcommand to ``subparsers``; return its parser."""
    from .certify.api import CERTIFIERS, METHODS

    cert_help = "; ".join(f"{m}: {', '.join(c)} (default {c[0]})" for m, c in CERTIFIERS.items())
    p = subparsers.add_parser(
        "certify",
        help="certified / exact W1 radii of a model on images",
        description=_DESCRIPTION,
    )
    p.add_argument(
        "--model",
        required=True,
        help="bundled name (linear, fc, cnn), an .onnx file or a flowverify checkpoint (.pt)",
    )
    p.add_argument(
        "--data",
        default="bundled",
        help="images: 'bundled' (500 bundled digits), .npz (x, optional y), MNIST IDX file "
        "or folder, or a PNG (default %(default)s)",
    )
    p.add_argument(
        "--indices",
        default=None,
        help="which images, e.g. '0:100' or '1,5,9' (default: all)",
    )
    p.add_argument("--method", default="vanilla", choices=METHODS, help="region/certifier family")
    p.add_argument("--certifier", default=None, help=f"certifier per method: {cert_help}")
    p.add_argument(
        "--references",
        default="uniform",
        help="reference distributions, comma separated: uniform, random:K, point:K, data:K "
        "(K images of --data other than the image); the radius is the max over them "
        "(default %(default)s; the paper's six: random:2,point:2,data:2)",
    )
    p.add_argument(
        "--input-scale",
        default="raw",
        choices=("raw", "normalised"),
        help="what the model consumes: the image as loaded (raw) or divided by its mass",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="decide this radius instead of searching (unit: --unit)",
    )
    p.add_argument(
        "--unit",
        default="normalised",
        choices=("normalised", "raw"),
        help="unit of --eps (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per image (complete: solver time limit; a timeout gives 'unknown' "
        "with the proven lower bound)",
    )
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the search")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (incomplete)")
    p.add_argument("--seed", type=int, default=0, help="seed of random/point/data references")
    p.add_argument("--device", default="cpu", help="torch device of bound propagation")
    p.add_argument(
        "--witness-dir",
        default=None,
        help="write adversarial images (exact results, falsified decisions) to DIR/<index>.npy",
    )
    p.add_argument("--out", required=True, help="JSONL output, one object per image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _config(args, certifier: str, labels_from: str) -> dict:
    from . import __version__

    return {
        "model": str(args.model),
        "data": str(args.data),
        "indices": args.indices,
        "method": args.method,
        "certifier": certifier,
        "references": args.references,
        "input_scale": args.input_scale,
        "eps": args.eps,
        "unit": args.unit,
        "timeout": args.timeout,
        "rtol": args.rtol,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
        "labels": labels_from,
        "version": __version__,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify certify``; write the JSONL file; return the exit code."""
    from .certify.api import CERTIFIERS, _iter_certify
    from .datasets import load_images, parse_indices
    from .models import load_model
    from .results import JsonlWriter, Status

    if args.method not in CERTIFIERS:
        raise ValueError(f"--method: expected one of {', '.join(CERTIFIERS)}, got {args.method!r}")
    valid = CERTIFIERS[args.method]
    certifier = valid[0] if args.certifier is None else args.certifier
    if certifier not in valid:
        raise ValueError(
            f"--certifier: unknown certifier {certifier!r} for --method {args.method}; valid: "
            f"{', '.join(valid)}"
        )
    if args.eps is not None and not (np.isfinite(args.eps) and args.eps >= 0):
        raise ValueError(f"--eps: expected a finite radius >= 0, got {args.eps}")
    if args.timeout is not None and not (np.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    if not (np.isfinite(args.rtol) and args.rtol > 0):
        raise ValueError(f"--rtol: expected a positive tolerance, got {args.rtol}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {args.batch_size}")
    x_all, y_all = load_images(args.data)
    sel = parse_indices(args.indices, x_all.shape[0])
    model = load_model(args.model)
    x = x_all[sel]
    labels = None if y_all is None else y_all[sel]
    config = _config(args, certifier, "data" if y_all is not None else "model predictions")
    if args.witness_dir:
        os.makedirs(args.witness_dir, exist_ok=True)
    counts: dict[str, int] = {}
    radii = []
    t0 = time.perf_counter()
    with JsonlWriter(args.out) as out:
        for res in _iter_certify(
            model,
            x,
            labels,
            method=args.method,
            certifier=certifier,
            references=args.references,
            eps=args.eps,
            unit=args.unit,
            input_scale=args.input_scale,
            timeout=args.timeout,
            device=args.device,
            seed=args.seed,
            data=x_all,
            indices=sel,
            batch_size=args.batch_size,
            rtol=args.rtol,
            progress=not args.no_progress,
        ):
            rec = res.to_dict()
            rec["config"] = config
            if args.witness_dir and res.witness is not None:
                path = os.path.join(args.witness_dir, f"{res.index}.npy")
                np.save(path, np.asarray(res.witness, dtype=np.float64))
                rec["witness_path"] = path
            out.write(rec)
            counts[str(res.status)] = counts.get(str(res.status), 0) + 1
            if res.status not in (Status.MISCLASSIFIED, Status.ERROR):
                radii.append(res.radius)
    n = int(sum(counts.values()))
    med = float(np.median(radii)) if radii else float("nan")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"certify {args.method}/{certifier}: {n} images in {time.perf_counter() - t0:.1f} s "
        f"({summary}); median radius {med:.6g} (normalised). Records: {args.out}",
        file=sys.stderr,
    )
    return 0
