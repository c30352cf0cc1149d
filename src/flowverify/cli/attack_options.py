"""The options of ``flowverify attack``, declared once (:mod:`flowverify.cli.options`):
its flags, the :func:`flowverify.attack` keywords they set, and the config recorded with
every result.

:data:`ATTACK_OPTIONS` lists them in the order of ``--help``; the execution options follow
them (:data:`flowverify.cli.runner_options.RUNNER_OPTIONS`).  The recorded config starts
with the attack's own resolved record (:meth:`flowverify.attacks.WassersteinPGD.config`,
which holds every option that sets a keyword, as the attack resolved it), followed by the
recorded options without a keyword and the derived fields, in schema order.
"""

from __future__ import annotations

import dataclasses

from flowverify.cli.options import Derived, Group, Option, OptionSchema
from flowverify.cli.shared_options import DATA, DEVICE, INDICES, MODEL, NO_PROGRESS

__all__ = ["ATTACK_OPTIONS", "DESCRIPTION"]

UNITS = (
    "Units: budgets and radii are normalised W1 (the image scaled to mass 1 per channel, "
    "the unit of the paper and of the attack literature), with the L1 distance between "
    "pixel coordinates as ground cost (one pixel step costs 1) on the whole grid; 'w1_raw' "
    "is W1 between the images as given (pixels in data units): raw = mass x normalised. "
    "Each record has w1_bound (the flow certificate ||δ̂-δµ||_1, normalised) >= w1 (the "
    "exact W1 of the returned image, normalised)."
)

DESCRIPTION = (
    "Find adversarial images within a W1 budget by projected gradient "
    "descent in the flow domain (paper section 4, Algorithm 1), or the smallest W1 "
    "radius at which the attack succeeds (--minimize: DeepFool-W1 steps and PGD at the "
    "budgets 0.05, 0.1, 0.2, 0.3, 0.5, 1.0 (doubled further where none succeeds), then "
    "their adversarials shrunk by a fast-minimum-norm search; 'inf' where it fails). "
    "Every success is re-checked by a forward pass on the returned image. Default threat "
    "model (the paper's): non-negative images of the input's mass, pixels not bounded "
    "above (see --clip-max). " + UNITS
)

#: ``--eps`` or ``--minimize``: exactly one.
MODE = Group(exclusive=True, required=True)


def _all_if_none(indices):
    return indices if indices is not None else "all"


ATTACK_OPTIONS = OptionSchema(
    MODEL,
    DATA,
    dataclasses.replace(INDICES, record_value=_all_if_none),
    Derived("n_images", "the number of images selected by --indices"),
    Option(
        "--eps",
        type=str,
        help="budget(s), normalised W1: 0.5 or a list 0.1,0.3,0.5,1.0 (one record per "
        "image and budget)",
        group=MODE,
        keyword="eps",
    ),
    Option(
        "--minimize",
        action="store_true",
        help="minimal-radius mode: the smallest W1 at which the attack succeeds, per image",
        group=MODE,
        record=False,  # the attack records it as its 'mode'
    ),
    Option(
        "--steps",
        type=int,
        default=30,
        help="gradient steps per run (default 30)",
        keyword="steps",
    ),
    Option(
        "--step-size",
        type=float,
        default=0.15,
        help="Euclidean step length as a fraction of the budget (default 0.15)",
        keyword="step_size",
    ),
    Option(
        "--loss",
        default="ce",
        help="adversarial loss: ce (cross-entropy, default, as the Python API), margin (the "
        "paper's f_y - max_t f_t; also 'cw') or dlr",
        keyword="loss",
    ),
    Option(
        "--schedule",
        default="cosine",
        help="cosine (default) or constant",
        keyword="schedule",
    ),
    Option(
        "--restarts",
        type=int,
        default=0,
        help="random restarts for failures (default 0)",
        keyword="restarts",
    ),
    Option(
        "--search-steps",
        type=int,
        default=6,
        help="--minimize: length of the shrinking search, in units of --steps "
        "(default 6: 6 x --steps iterations)",
        keyword="search_steps",
    ),
    Option(
        "--clip-max",
        type=float,
        help="pixel upper bound in data units (e.g. 1.0): a smaller threat set, labelled "
        "'w1+pixels<=U' in the records. Default: none, the paper's threat model (non-negative "
        "images of the input's mass), where adversarial pixels may exceed the data's range "
        "(each record gives the adversarial's 'max_pixel'; the summary notes it)",
        keyword="clip_max",
    ),
    Option(
        "--input-scale",
        default="raw",
        help="raw: the model consumes the image in data units (default); normalised: the "
        "image divided by its mass",
        keyword="input_scale",
    ),
    Option(
        "--reference",
        default="image",
        help="image (default: R = the image, δµ = 0, exact), uniform, random or point "
        "(Algorithm 1 literally; the result does not depend on R up to rounding)",
        keyword="reference",
    ),
    Option(
        "--fuse",
        action="store_true",
        help="fuse the first layer (needs --reference)",
        keyword="fuse",
    ),
    Option(
        "--seed",
        type=int,
        default=0,
        help="seed of restarts/references (default 0)",
        keyword="seed",
    ),
    DEVICE,
    Option(
        "--batch-size",
        type=int,
        default=100,
        help="images per batch, also the unit of work given to a worker (results are those "
        "of a serial run with the same --batch-size); default 100",
    ),
    Derived("flowverify_version", "the flowverify version"),
    Option(
        "--out",
        required=True,
        help="JSONL output, one record per (image, eps); an existing file written with the "
        "same options is resumed (images already recorded are skipped), see --overwrite",
        record=False,
    ),
    Option(
        "--save-adversarial",
        metavar="FILE.npz",
        help="save the returned images: 'adversarial' (rows, C, H, W) in data units, "
        "'index' and 'eps' per row, plus 'success' and 'w1'; one row per record of --out, "
        "in the same order (also after a resume)",
        record=False,
    ),
    NO_PROGRESS,
)
