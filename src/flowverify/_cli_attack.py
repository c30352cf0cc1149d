"""``flowverify attack``: Wasserstein PGD in the flow domain from the command line.

Wired by :mod:`flowverify.cli`: :func:`add_parser` adds the subcommand, :func:`run` runs
it.  Bad input raises ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` naming the
argument; the CLI turns those into one line on stderr and exit code 2.

Output: one JSON object per (image, budget) (minimal-radius mode: per image), each with
the resolved configuration under the key ``config``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import numpy as np

logger = logging.getLogger(__name__)

_UNITS = (
    "Units: budgets and radii are normalised W1 (the image scaled to mass 1 per channel, "
    "the unit of the paper and of the attack literature), with the L1 distance between "
    "pixel coordinates as ground cost (one pixel step costs 1) on the whole grid; 'w1_raw' "
    "is W1 between the images as given (pixels in data units): raw = mass x normalised. "
    "Each record has w1_bound (the flow certificate ||δ̂-δµ||_1, normalised) >= w1 (the "
    "exact W1 of the returned image, normalised)."
)


def _parse_eps(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            val = float(part)
        except ValueError:
            raise ValueError(
                f"--eps: expected a number or a comma-separated list (e.g. 0.1,0.3), got {text!r}"
            ) from None
        if not math.isfinite(val) or val < 0:
            raise ValueError(f"--eps: expected finite budgets >= 0, got {part}")
        out.append(val)
    if not out:
        raise ValueError(f"--eps: expected at least one budget, got {text!r}")
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``attack`` subcommand to ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "attack",
        help="Wasserstein PGD attack in the flow domain (fixed budget or minimal radius)",
        description="Find adversarial images within a W1 budget by projected gradient "
        "descent in the flow domain (paper section 4, Algorithm 1), or the smallest W1 "
        "radius at which the attack succeeds (--minimize: DeepFool-W1 steps, then a "
        "bisection with warm-started PGD; 'inf' where it fails). Every success is re-checked "
        "by a forward pass on the returned image. " + _UNITS,
    )
    p.add_argument("--model", required=True, help="bundled name (linear, fc, cnn), .onnx or .pt")
    p.add_argument("--data", required=True, help="images: .npz (x, y), MNIST IDX/folder, PNG")
    p.add_argument("--indices", default=None, help="which images, e.g. 0:100 or 1,5,9 (all)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--eps",
        type=str,
        default=None,
        help="budget(s), normalised W1: 0.5 or a list 0.1,0.3,0.5,1.0 (one record per "
        "image and budget)",
    )
    mode.add_argument(
        "--minimize",
        action="store_true",
        help="minimal-radius mode: the smallest W1 at which the attack succeeds, per image",
    )
    p.add_argument("--steps", type=int, default=30, help="gradient steps per run (default 30)")
    p.add_argument(
        "--step-size",
        type=float,
        default=0.15,
        help="Euclidean step length as a fraction of the budget (default 0.15)",
    )
    p.add_argument("--loss", default="margin", help="margin (default), ce (cross-entropy) or dlr")
    p.add_argument("--schedule", default="cosine", help="cosine (default) or constant")
    p.add_argument(
        "--restarts", type=int, default=0, help="random restarts for failures (default 0)"
    )
    p.add_argument(
        "--search-steps",
        type=int,
        default=6,
        help="--minimize: bisection probes after the first success (default 6)",
    )
    p.add_argument(
        "--clip-max",
        type=float,
        default=None,
        help="pixel upper bound in data units (e.g. 1.0): a different threat model, "
        "labelled 'w1+pixels<=U' in the records",
    )
    p.add_argument(
        "--input-scale",
        default="raw",
        help="raw: the model consumes the image in data units (default); normalised: the "
        "image divided by its mass",
    )
    p.add_argument(
        "--reference",
        default="image",
        help="image (default: R = the image, δµ = 0, exact), uniform, random or point "
        "(Algorithm 1 literally; the result does not depend on R up to rounding)",
    )
    p.add_argument("--fuse", action="store_true", help="fuse the first layer (needs --reference)")
    p.add_argument("--seed", type=int, default=0, help="seed of restarts/references (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100)")
    p.add_argument("--out", required=True, help="JSONL output, one record per (image, eps)")
    p.add_argument(
        "--save-adversarial",
        default=None,
        metavar="FILE.npz",
        help="save the returned images: 'adversarial' (rows, C, H, W) in data units, "
        "'index' and 'eps' per row, plus 'success' and 'w1'",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _config(args, attack, sel: np.ndarray) -> dict:
    from . import __version__

    cfg = attack.config()
    cfg.update(
        model=str(args.model),
        data=str(args.data),
        indices=args.indices if args.indices is not None else "all",
        n_images=int(sel.size),
        batch_size=args.batch_size,
        flowverify_version=__version__,
    )
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify attack``; returns the exit code."""
    import torch
    from tqdm import tqdm

    from .attack import WassersteinPGD
    from .datasets import load_images, parse_indices
    from .models import load_model
    from .results import JsonlWriter

    eps = None if args.minimize else _parse_eps(args.eps)
    if isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    reference = None if args.reference == "image" else args.reference
    if reference is not None and reference not in ("uniform", "random", "point"):
        raise ValueError(
            f"--reference: unknown reference {args.reference!r}; valid: image, uniform, "
            "random, point"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for, but no CUDA device is available")
    try:
        attack = WassersteinPGD(
            eps=eps,
            steps=args.steps,
            step_size=args.step_size,
            loss=args.loss,
            schedule=args.schedule,
            restarts=args.restarts,
            search_steps=args.search_steps,
            clip_max=args.clip_max,
            input_scale=args.input_scale,
            reference=reference,
            fuse=args.fuse,
            seed=args.seed,
            device=device,
        )
    except (ValueError, TypeError) as exc:  # name the flag, not the keyword
        msg = str(exc)
        name = msg.split(":", 1)[0]
        raise type(exc)(f"--{name.replace('_', '-')}:{msg.split(':', 1)[1]}") from None
    x_all, y_all = load_images(args.data)
    sel = parse_indices(args.indices, x_all.shape[0]) if args.indices is not None else None
    if sel is None:
        sel = np.arange(x_all.shape[0])
    x = x_all[sel]
    y = None if y_all is None else y_all[sel]
    model = load_model(args.model).to(device)
    config = _config(args, attack, sel)
    logger.info("attack: %r on %d images", attack, x.shape[0])
    adv_rows, idx_rows, eps_rows, succ_rows, w1_rows = [], [], [], [], []
    summary: dict[float, list[tuple[bool, float, float]]] = {}
    t0 = time.perf_counter()
    starts = range(0, x.shape[0], args.batch_size)
    bar = tqdm(
        total=x.shape[0],
        desc="attack",
        unit="img",
        file=sys.stderr,
        disable=args.no_progress or None,
        leave=False,
    )
    with JsonlWriter(args.out) as out:
        for s in starts:
            xb = x[s : s + args.batch_size]
            yb = None if y is None else y[s : s + args.batch_size]
            res = attack(model, xb, yb)
            data_idx = sel[s : s + args.batch_size]
            for rec in res.to_records(indices=data_idx, config=config):
                out.write(rec)
            for r in range(len(res)):
                key = math.inf if eps is None else float(res.eps[r])
                summary.setdefault(key, []).append(
                    (bool(res.success[r]), float(res.w1[r]), float(res.seconds[r]))
                )
            if args.save_adversarial:
                adv_rows.append(res.adversarial)
                idx_rows.append(data_idx[res.index])
                eps_rows.append(res.eps)
                succ_rows.append(res.success)
                w1_rows.append(res.w1)
            bar.update(xb.shape[0])
    bar.close()
    if args.save_adversarial:
        np.savez_compressed(
            args.save_adversarial,
            adversarial=np.concatenate(adv_rows) if adv_rows else np.zeros((0,)),
            index=np.concatenate(idx_rows) if idx_rows else np.zeros((0,), np.int64),
            eps=np.concatenate(eps_rows) if eps_rows else np.zeros((0,)),
            success=np.concatenate(succ_rows) if succ_rows else np.zeros((0,), bool),
            w1=np.concatenate(w1_rows) if w1_rows else np.zeros((0,)),
        )
    _print_summary(summary, eps is None, attack.threat_model, time.perf_counter() - t0, args.out)
    return 0


def _print_summary(summary, minimal: bool, threat: str, seconds: float, out: str) -> None:
    print(f"threat model {threat}; W1 normalised (L1 ground cost); records: {out}")
    if minimal:
        rows = summary.get(math.inf, [])
        w1 = np.array([r[1] for r in rows]) if rows else np.zeros(0)
        found = np.isfinite(w1)
        med = float(np.median(w1)) if w1.size else math.nan
        print(
            f"minimal radius: {int(found.sum())}/{w1.size} found, median W1 {med:.4f}, "
            f"{seconds / max(w1.size, 1):.4f} s/image"
        )
        return
    print(f"{'eps':>8}  {'success':>8}  {'median W1':>10}  {'s/image':>9}")
    for key in sorted(summary):
        rows = summary[key]
        succ = np.array([r[0] for r in rows])
        w1 = np.array([r[1] for r in rows])
        med = float(np.median(w1[succ])) if succ.any() else math.nan
        sec = float(np.mean([r[2] for r in rows]))
        print(f"{key:8.4g}  {succ.mean():8.3f}  {med:10.4f}  {sec:9.4f}")
