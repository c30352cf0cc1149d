"""``flowverify attack``: Wasserstein PGD in the flow domain from the command line.

Wired by :mod:`flowverify.cli`: :func:`add_parser` adds the subcommand, :func:`run` runs
it.  Bad input raises ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` naming the
argument; the CLI turns those into one line on stderr and exit code 2.  The options are
declared in :mod:`flowverify.cli.attack_options`.

Output: one JSON object per (image, budget) (minimal-radius mode: per image), each with
the resolved configuration under the key ``config``; the records of an image are
consecutive (its budgets in the order given) and the images in input order.

Execution (:mod:`flowverify.runner`, as for ``flowverify certify``): fixed batches of
``--batch-size`` consecutive indices, serially or on ``--workers`` local processes or Ray
tasks; each batch's records are appended and fsync'ed as soon as they are known and the
file is put in input order at the end (identical to the serial run's, timings aside).
Re-running the same command resumes ``--out``; ``--overwrite`` starts afresh; a file
written with a different config is refused.  An image whose attack fails gets
``status="error"`` records (one per budget, with the message under ``error``).

``--save-adversarial FILE.npz`` holds one row per record of ``--out`` (earlier runs
included), in the same order (:mod:`flowverify.cli.adversarial_store`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os

import numpy as np

from flowverify.cli import common
from flowverify.cli.adversarial_store import AdversarialStore, check_npz_path
from flowverify.cli.attack_options import ATTACK_OPTIONS, DESCRIPTION
from flowverify.cli.runner_options import add_runner_args

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``attack`` subcommand to ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "attack",
        help="Wasserstein PGD attack in the flow domain (fixed budget or minimal radius)",
        description=DESCRIPTION,
    )
    ATTACK_OPTIONS.add_arguments(p)
    add_runner_args(p)
    return p


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


def _make_attack(keywords: dict):
    """The :class:`~flowverify.attacks.pgd.WassersteinPGD` of the command; its errors name
    the flag of the keyword they name."""
    from flowverify.attacks.pgd import WassersteinPGD

    try:
        return WassersteinPGD(**keywords)
    except (ValueError, TypeError) as exc:  # name the flag, not the keyword
        name, sep, rest = str(exc).partition(":")
        if not sep:
            raise
        flag = ATTACK_OPTIONS.flags().get(name, f"--{name.replace('_', '-')}")
        raise type(exc)(f"{flag}:{rest}") from None


def _attack_work(batch: list[int], *, model: str, data: str, attack: dict, save: bool):
    """Attack the images ``batch`` of ``data`` (the runner's work function).

    Runs in a worker (or serially in the main process); ``attack`` holds the
    :class:`~flowverify.attacks.pgd.WassersteinPGD` keywords of the command.  An exception
    on a batch of several images re-runs them one at a time, so that only the failing
    image gets ``status="error"`` records.  With ``save``, each record carries its
    adversarial image as an attachment (see :data:`flowverify.runner.ATTACH_KEY`).
    """
    import torch

    from flowverify.attacks.pgd import WassersteinPGD
    from flowverify.runner import ATTACH_KEY

    dev = torch.device(attack["device"])
    atk = WassersteinPGD(**{**attack, "device": dev})
    x_all, y_all = common.cached_data(data)
    idx = np.asarray(batch, dtype=np.int64)
    try:
        net = common.cached_model(model).to(dev)
        res = atk(net, x_all[idx], None if y_all is None else np.asarray(y_all)[idx])
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        work = functools.partial(_attack_work, model=model, data=data, attack=attack, save=save)
        return common.retry_alone(
            work, batch, exc, y_all, functools.partial(_attack_errors, atk=atk)
        )
    records = res.to_records(indices=idx)
    if save:
        for r, rec in enumerate(records):
            rec[ATTACH_KEY] = res.adversarial[r]
    return records


def _attack_errors(index: int, label: int, exc: Exception, *, atk) -> list[dict]:
    """The ``status="error"`` records of an image (one per budget), with every field of an
    attack record (``success`` false, distances null)."""
    msg = common.error_text(exc)
    budgets = [None] if atk.eps is None else list(atk.eps)
    return [
        {
            "kind": "attack",
            "status": "error",
            "index": int(index),
            "label": int(label),
            "prediction": -1,
            "eps": eps,
            "success": False,
            "w1_bound": None,
            "w1": None,
            "w1_raw": None,
            "prediction_adversarial": None,
            "iterations": 0,
            "seconds": 0.0,
            "max_pixel": None,
            "unit": "normalised",
            "threat_model": atk.threat_model,
            "mode": "minimal" if atk.eps is None else "fixed",
            "error": msg,
        }
        for eps in budgets
    ]


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify attack``; returns the exit code."""
    from flowverify import __version__
    from flowverify.core.results import read_jsonl
    from flowverify.runner import WorkerCrashedError

    # Every check comes before anything is written.
    eps = None if args.minimize else _parse_eps(args.eps)
    if isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    reference = None if args.reference == "image" else args.reference
    if reference is not None and reference not in ("uniform", "random", "point"):
        raise ValueError(
            f"--reference: unknown reference {args.reference!r}; valid: image, uniform, "
            "random, point"
        )
    common.check_execution(args)
    keywords = ATTACK_OPTIONS.keywords(
        args, eps=eps, reference=reference, device=args.device.strip()
    )
    attack = _make_attack(keywords)
    npz = None if args.save_adversarial is None else check_npz_path(args.save_adversarial)
    _, x_all, _, sel, data_spec, model_spec = common.load_inputs(args)
    config = ATTACK_OPTIONS.recorded_config(
        args, resolved=attack.config(), n_images=int(sel.size), flowverify_version=__version__
    )
    kept = common.existing_records_of(args, config)
    store = None
    if npz is not None:
        store = AdversarialStore(npz, x_all)
        if args.overwrite:
            store.clear_parts()
        else:
            store.check(kept)
    logger.info("attack: %r on %d images", attack, sel.size)
    work = functools.partial(
        _attack_work, model=model_spec, data=data_spec, attack=keywords, save=store is not None
    )
    save = None if store is None else store.save
    try:
        records = common.run_batches(
            args, sel, work, config, batch_size=args.batch_size, desc="attack", on_attachment=save
        )
    except (KeyboardInterrupt, WorkerCrashedError) as exc:
        # The runner left --out valid and in order: the npz follows it.
        if store is not None and os.path.exists(args.out):
            store.assemble(read_jsonl(args.out))
        if isinstance(exc, WorkerCrashedError):
            return common.crashed("attack", exc)
        raise
    if store is not None:
        store.assemble(records)
    _print_results(records, eps is None, attack.threat_model, args.out)
    data_max = float(np.max(x_all[sel])) if sel.size else math.nan
    _print_range_note(_peaks(records), data_max, args.clip_max)
    n_errors = sum(rec.get("status") == "error" for rec in records)
    if n_errors:
        print(f"{n_errors} error record(s) (status 'error', message under 'error')")
    return 0


# --------------------------------------------------------------------------- summary


def _print_results(records: list[dict], minimal: bool, threat: str, out: str) -> None:
    """The summary table of the records (earlier runs' included), error records aside."""
    summary: dict[float, list[tuple[bool, float, float]]] = {}
    for rec in records:
        if rec.get("status") == "error":
            continue
        key = math.inf if minimal else common.summary_float(rec.get("eps"))
        summary.setdefault(key, []).append(
            (
                rec.get("success") is True,
                common.summary_float(rec.get("w1")),
                common.summary_float(rec.get("seconds")),
            )
        )
    # attack time of every record: per image in minimal mode
    seconds = sum(r[2] for rows in summary.values() for r in rows if math.isfinite(r[2]))
    _print_summary(summary, minimal, threat, seconds, out)


def _peaks(records: list[dict]) -> list[float]:
    """The largest pixel of each successful adversarial."""
    return [
        common.summary_float(rec.get("max_pixel"))
        for rec in records
        if rec.get("status") != "error"
        and rec.get("success") is True
        and rec.get("max_pixel") is not None
    ]


def _threat_words(threat: str) -> str:
    if threat == "w1":
        return (
            "threat model w1 (the paper's): non-negative images of the input's mass per "
            "channel, pixels not bounded above"
        )
    return f"threat model {threat}: non-negative images of the input's mass, {threat[3:]}"


def _print_range_note(peaks: list[float], data_max: float, clip_max: float | None) -> None:
    """Note the adversarials whose pixels exceed the largest pixel of the attacked data."""
    if clip_max is not None or not peaks or not math.isfinite(data_max):
        return
    above = [p for p in peaks if p > data_max * (1 + 1e-6)]
    if above:
        print(
            f"note: {len(above)} of {len(peaks)} adversarials have pixels above the data's "
            f"maximum {data_max:g} (largest {max(above):.3g}), which the default threat "
            f"model allows; --clip-max {data_max:g} bounds the pixels (a smaller threat "
            "set: records say 'max_pixel' per adversarial)"
        )


def _print_summary(summary, minimal: bool, threat: str, seconds: float, out: str) -> None:
    print(f"{_threat_words(threat)}; W1 normalised (L1 ground cost); records: {out}")
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
