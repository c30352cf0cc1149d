"""The options of ``flowverify certify``, declared once (:mod:`flowverify.cli.options`):
its flags, the :func:`flowverify.certify` keywords they set, and the config recorded
with every result.

:data:`CERTIFY_OPTIONS` lists them in the order of ``--help`` and of the recorded config
(``labels`` and ``version`` are derived fields; the smoothing options are recorded only
with ``--method smoothing``); the execution options follow them
(:data:`flowverify.cli.runner_options.RUNNER_OPTIONS`).
"""

from __future__ import annotations

import dataclasses

from flowverify.cli.options import Derived, Group, Option, OptionSchema
from flowverify.cli.shared_options import DATA, DEVICE, INDICES, MODEL, NO_PROGRESS
from flowverify.verification import CERTIFIERS, METHODS

__all__ = ["CERTIFY_OPTIONS", "DESCRIPTION", "SMOOTHING_KEYWORDS"]

UNITS = (
    "Units: 'radius' is the normalised W1 radius (images scaled to mass 1 per channel, the "
    "paper's unit); 'radius_raw' is in data units (pixels as loaded, W1 between the images "
    "as given: raw = mass x normalised). Ground cost: L1 distance between pixel "
    "coordinates (one pixel step costs 1)."
)

DESCRIPTION = (
    "Certify a classifier against Wasserstein (W1) perturbations. For each image, the "
    "largest W1 radius within which the class provably stays the same. Methods (the "
    "paper's Table 1): 'vanilla' (L1 ball in the flow domain, Theorem 3), 'feasible' "
    "(the ball intersected with the feasibility polytope R + A flow >= 0, Theorem 6; never "
    "below vanilla), 'complete' (the exact radius and the closest adversarial image), "
    "'complete-ball' (exact radius of the L1 ball, a lower bound of the W1 radius). "
    "Incomplete radii come from a search to relative tolerance --rtol; --eps decides one "
    "radius instead (certified / falsified / unknown). " + UNITS
)

_CERTIFIER_HELP = "; ".join(f"{m}: {', '.join(c)} (default {c[0]})" for m, c in CERTIFIERS.items())

SMOOTHING = Group(
    "smoothing (--method smoothing: Levine & Feizi's Wasserstein smoothing; the model is "
    "the base classifier, trained with this noise)"
)


def _smoothing(args) -> bool:
    return args.method == "smoothing"


def _smoothing_option(flag: str, **settings) -> Option:
    """An option of the smoothing group: recorded with ``--method smoothing`` only."""
    keyword = flag.lstrip("-").replace("-", "_")
    return Option(flag, group=SMOOTHING, keyword=keyword, record_when=_smoothing, **settings)


CERTIFY_OPTIONS = OptionSchema(
    MODEL,
    DATA,
    INDICES,
    Option(
        "--method",
        default="vanilla",
        choices=METHODS,
        help="region/certifier family",
        keyword="method",
    ),
    Option(
        "--certifier",
        help=f"certifier per method: {_CERTIFIER_HELP}",
        keyword="certifier",
    ),
    Option(
        "--references",
        default="uniform",
        help="reference distributions, comma separated: uniform, random:K, point:K, data:K "
        "(K images of --data other than the image); the radius is the max over them "
        "(default %(default)s; the paper's six: random:2,point:2,data:2). No radius "
        "depends on the reference (docs/REPRODUCTION.md): it is computed once, and the "
        "summary says so when several are given",
        keyword="references",
    ),
    Option(
        "--input-scale",
        default="raw",
        choices=("raw", "normalised"),
        help="what the model consumes: the image as loaded (raw) or divided by its mass",
        keyword="input_scale",
    ),
    Option(
        "--eps",
        type=float,
        help="decide this radius instead of searching (unit: --unit)",
        keyword="eps",
    ),
    Option(
        "--unit",
        default="normalised",
        choices=("normalised", "raw"),
        help="unit of --eps (default %(default)s)",
        keyword="unit",
    ),
    Option(
        "--timeout",
        type=float,
        help="seconds per image (complete: solver time limit; a timeout gives 'unknown' "
        "with the proven lower bound)",
        keyword="timeout",
    ),
    Option(
        "--rtol",
        type=float,
        default=1e-3,
        help="relative tolerance of the search",
        keyword="rtol",
    ),
    Option(
        "--batch-size",
        type=int,
        default=32,
        help="images per batch of the incomplete methods, and per unit of work given to a "
        "worker (results are those of a serial run with the same --batch-size; lower it to "
        "spread few images over many workers); default %(default)s",
    ),
    Option(
        "--seed",
        type=int,
        default=0,
        help="seed of random/point/data references",
        keyword="seed",
    ),
    dataclasses.replace(DEVICE, help="torch device of bound propagation: " + DEVICE.help),
    Option(
        "--witness-dir",
        help="write adversarial images to DIR/<index>.npy: exact results (the closest), "
        "falsified decisions, and for 'unknown' complete results the closest one found "
        "(W1 'upper'; not a proof that none is closer); the record's 'witness_kind' says "
        "which",
        record=False,
    ),
    Option(
        "--out",
        required=True,
        help="JSONL output, one object per image; an existing file written with the same "
        "options is resumed (images already recorded are skipped), see --overwrite",
        record=False,
    ),
    NO_PROGRESS,
    Derived("labels", "where the labels come from: 'data' or 'model predictions'"),
    Derived("version", "the flowverify version"),
    _smoothing_option(
        "--sigma",
        type=float,
        help="noise level: standard deviation of one flow coordinate of the normalised image "
        "(Laplace scale sigma/sqrt(2)); required by --method smoothing",
    ),
    _smoothing_option(
        "--n0", type=int, default=1000, help="selection samples per image (default %(default)s)"
    ),
    _smoothing_option(
        "--n-samples",
        type=int,
        default=10000,
        help="estimation samples per image (default %(default)s)",
    ),
    _smoothing_option(
        "--alpha",
        type=float,
        default=0.05,
        help="failure probability of each certificate (default %(default)s)",
    ),
)

#: The :func:`flowverify.certify` keywords of ``method="smoothing"`` alone.
SMOOTHING_KEYWORDS = tuple(o.keyword for o in CERTIFY_OPTIONS.options if o.group is SMOOTHING)
