"""The ``flowverify certify`` subcommand: certified and exact W1 radii, one JSON per image.

Wiring (``flowverify.cli``): :func:`add_parser` adds the subcommand to the subparsers,
:func:`run` executes it and returns the exit code.  Bad input raises ``ValueError``,
``TypeError`` or ``FileNotFoundError`` naming the argument; the main CLI turns them into
one line on stderr and exit code 2.  The options are declared in
:mod:`flowverify.cli.certify_options`.

Output: one JSON object per image (see :class:`flowverify.verification.CertifyResult`), each
with the resolved configuration under ``"config"``; with ``--witness-dir DIR``, every
result that carries an adversarial image writes it to ``DIR/<index>.npy`` (float64, the
input's shape and mass), and its record says what it is under ``witness_kind``:
``closest`` (exact results), ``within-eps`` (falsified decisions) or ``closest-found``
(a complete method stopped at its limit: the closest adversarial image found, at W1
``upper``, which proves no more than radius <= upper).

Execution (:mod:`flowverify.runner`): images are certified in fixed batches of
``--batch-size`` consecutive indices (one image per batch for the complete methods),
serially or on ``--workers`` local processes or Ray tasks (``--backend ray``); each batch's
records are appended and fsync'ed as soon as they are known, and the file is put in input
order at the end, so that it is identical to the serial run's (timings aside).
Re-running the same command resumes ``--out`` (``--overwrite`` starts afresh); a file
written with a different config is refused.  An image whose computation fails gets a
``status="error"`` record (``message`` and ``error``: the exception) and the run goes on.

Every argument is checked before anything is written: a bad one is reported by the CLI on
one line naming the flag, with exit code 2, and leaves no output behind.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings

import numpy as np

from flowverify.cli import common
from flowverify.cli.certify_options import CERTIFY_OPTIONS, DESCRIPTION, SMOOTHING_KEYWORDS
from flowverify.cli.runner_options import add_runner_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``certify`` subcommand to ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "certify",
        help="certified / exact W1 radii of a model on images",
        description=DESCRIPTION,
    )
    CERTIFY_OPTIONS.add_arguments(p)
    add_runner_args(p)
    return p


# --------------------------------------------------------------------------- checks


def _check_options(args: argparse.Namespace) -> str:
    """Check the certify options (no file touched); returns the resolved certifier."""
    from flowverify.verification import CERTIFIERS

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
    if args.seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {args.seed}")
    if args.method == "smoothing":
        _check_smoothing(args)
    elif args.sigma is not None:
        raise ValueError("--sigma: only used by --method smoothing")
    if args.witness_dir is not None and (
        not str(args.witness_dir) or os.path.isfile(args.witness_dir)
    ):
        raise ValueError(f"--witness-dir: expected a folder, got {str(args.witness_dir)!r}")
    return certifier


def _check_smoothing(args: argparse.Namespace) -> None:
    if args.sigma is None or not (np.isfinite(args.sigma) and args.sigma > 0):
        raise ValueError(f"--sigma: --method smoothing needs a noise level > 0, got {args.sigma}")
    if args.n0 < 1 or args.n_samples < 1:
        raise ValueError(
            f"--n0, --n-samples: expected positive sample counts, got {args.n0}, {args.n_samples}"
        )
    if not (0 < args.alpha < 1):
        raise ValueError(f"--alpha: expected a probability in (0, 1), got {args.alpha}")
    if args.eps is not None:
        raise ValueError("--eps: fixed-radius decisions are not available for smoothing")
    if args.input_scale != "raw":
        raise ValueError("--input-scale: smoothing base nets consume raw images ('raw')")


def _check_certifiable(model, x: np.ndarray, method: str, certifier: str, scale: str) -> None:
    """Refuse, once and before any work, a model the method cannot certify (naming the
    layer or operator), instead of an error record per image."""
    from flowverify.verification.api import check_certifiable

    # the names in check_certifiable's messages -> the flags that set them
    flags = {**CERTIFY_OPTIONS.flags(), "model": "--model", "images": "--data"}
    try:
        check_certifiable(model, x, method=method, certifier=certifier, input_scale=scale)
    except (ValueError, TypeError) as exc:
        head = str(exc).partition(":")[0].strip()
        raise common.renamed(exc, flags.get(head, "--model"), (head,)) from None


# --------------------------------------------------------------------------- work


def _certify_work(
    batch: list[int], *, model: str, data: str, witness_dir: str | None, keywords: dict
) -> list[dict]:
    """Certify the images ``batch`` of ``data`` (the runner's work function).

    Runs in a worker (or serially in the main process); ``keywords`` are the
    :func:`flowverify.certify` keywords of the command.  An exception on a batch of several
    images re-runs them one at a time, so that only the failing image gets a
    ``status="error"`` record.  Witnesses travel back as attachments when ``witness_dir``
    is set.
    """
    from flowverify.api import certify, iter_certify
    from flowverify.runner import ATTACH_KEY

    net = common.cached_model(model)
    x_all, y_all = common.cached_data(data)
    idx = np.asarray(batch, dtype=np.int64)
    labels = None if y_all is None else np.asarray(y_all)[idx]
    try:
        if keywords["method"] == "smoothing":
            smooth = {k: keywords[k] for k in SMOOTHING_KEYWORDS}
            results = certify(
                net,
                x_all[idx],
                labels,
                method="smoothing",
                device=keywords["device"],
                seed=keywords["seed"],
                indices=idx,
                **smooth,
            )
        else:
            search = {k: v for k, v in keywords.items() if k not in SMOOTHING_KEYWORDS}
            with warnings.catch_warnings():  # the CLI's summary states it once
                warnings.filterwarnings("ignore", message="references: ")
                results = list(
                    iter_certify(
                        net,
                        x_all[idx],
                        labels,
                        data=x_all,
                        indices=idx,
                        batch_size=max(len(idx), 1),
                        progress=False,
                        **search,
                    )
                )
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        work = functools.partial(
            _certify_work, model=model, data=data, witness_dir=witness_dir, keywords=keywords
        )
        errors = functools.partial(
            _certify_error, method=keywords["method"], certifier=keywords["certifier"]
        )
        return common.retry_alone(work, batch, exc, y_all, errors)
    records = []
    for res in results:
        rec = res.to_dict()
        if witness_dir and res.witness is not None:
            rec["witness_path"] = os.path.join(witness_dir, f"{res.index}.npy")
            rec[ATTACH_KEY] = np.asarray(res.witness, dtype=np.float64)
        records.append(rec)
    return records


def _certify_error(
    index: int, label: int, exc: Exception, *, method: str, certifier: str
) -> list[dict]:
    """The ``status="error"`` record of an image: every field of a certify record."""
    from flowverify.core.results import Status
    from flowverify.verification import CertifyResult

    msg = common.error_text(exc)
    res = CertifyResult(
        index=int(index),
        label=int(label),
        prediction=-1,
        method=method,
        certifier=certifier,
        references=[],
        status=Status.ERROR,
        radius=0.0,
        radius_raw=0.0,
        message=msg,
    )
    return [{**res.to_dict(), "error": msg}]


def _witness_writer(witness_dir: str):
    """Create ``--witness-dir``; the runner's ``on_attachment`` that saves witnesses."""
    try:
        os.makedirs(witness_dir, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--witness-dir: cannot create {witness_dir!r} ({exc})") from None

    def on_attachment(index: int, payloads: list) -> None:
        path = os.path.join(witness_dir, f"{index}.npy")
        for arr in payloads:
            if arr is not None:
                try:
                    common.save_array(path, arr)
                except OSError as exc:
                    raise ValueError(f"--witness-dir: cannot write {path!r} ({exc})") from None

    return on_attachment


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify certify``; write the JSONL file; return the exit code."""
    from flowverify import __version__
    from flowverify.core.results import Status
    from flowverify.runner import WorkerCrashedError
    from flowverify.transport.references import parse_references
    from flowverify.verification import references_note

    # Every check comes before anything is written.
    certifier = _check_options(args)
    common.check_execution(args)
    model, x_all, y_all, sel, data_spec, model_spec = common.load_inputs(args)
    _check_certifiable(model, x_all[sel[:1]], args.method, certifier, args.input_scale)
    try:
        refs = parse_references(
            args.references, data=x_all, exclude_index=int(sel[0]), seed=int(args.seed)
        )
    except (ValueError, TypeError) as exc:
        raise common.renamed(exc, "--references", ("references",)) from None
    ref_note = references_note(args.method, certifier, len(refs))
    config = CERTIFY_OPTIONS.recorded_config(
        args,
        certifier=certifier,
        labels="data" if y_all is not None else "model predictions",
        version=__version__,
    )
    common.existing_records_of(args, config)

    witness_dir = None if args.witness_dir is None else str(args.witness_dir)
    on_attachment = None if witness_dir is None else _witness_writer(witness_dir)
    keywords = CERTIFY_OPTIONS.keywords(
        args, certifier=certifier, device=args.device.strip(), seed=int(args.seed)
    )
    work = functools.partial(
        _certify_work, model=model_spec, data=data_spec, witness_dir=witness_dir, keywords=keywords
    )
    del model  # loaded and cached for the serial path; workers load their own
    batch_size = 1 if args.method.startswith("complete") else args.batch_size
    desc = f"certify {args.method}"
    t0 = time.perf_counter()
    try:
        records = common.run_batches(
            args, sel, work, config, batch_size=batch_size, desc=desc, on_attachment=on_attachment
        )
    except WorkerCrashedError as exc:
        return common.crashed("certify", exc)
    counts: dict[str, int] = {}
    radii = []
    for rec in records:
        status = str(rec.get("status"))
        counts[status] = counts.get(status, 0) + 1
        if status not in (Status.MISCLASSIFIED.value, Status.ERROR.value):
            radii.append(common.summary_float(rec.get("radius")))
    n = len(records)
    med = float(np.median(radii)) if radii else float("nan")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"certify {args.method}/{certifier}: {n} images in {time.perf_counter() - t0:.1f} s "
        f"({summary}); median radius {med:.6g} (normalised). Records: {args.out}",
        file=sys.stderr,
    )
    if ref_note is not None:
        print(f"note: --references: {ref_note}", file=sys.stderr)
    return 0
