"""``flowverify attack``: Wasserstein PGD in the flow domain from the command line.

Wired by :mod:`flowverify.cli`: :func:`add_parser` adds the subcommand, :func:`run` runs
it.  Bad input raises ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` naming the
argument; the CLI turns those into one line on stderr and exit code 2.

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
included), in the same order.  It is rebuilt atomically at the end of every run, also an
interrupted one: each batch's images are first saved to ``FILE.npz.parts/<index>.npy``
before its records are written (so a killed run loses none), and that folder is removed
once the npz holds them all.  A resumed run takes the images of earlier records from the
parts or from the existing npz; if some are in neither, it is refused before any work
(``--overwrite`` recomputes everything).  Error records give rows of NaN pixels.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from flowverify.cli.certify_cmd import (
    _cached_data,
    _cached_model,
    _check_execution,
    _crashed,
    _load_inputs,
    _ray_options,
    _save_array,
    _summary_float,
)
from flowverify.core.interrupt import raise_if_interrupted

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
    from flowverify.cli.runner_options import add_runner_args

    p = subparsers.add_parser(
        "attack",
        help="Wasserstein PGD attack in the flow domain (fixed budget or minimal radius)",
        description="Find adversarial images within a W1 budget by projected gradient "
        "descent in the flow domain (paper section 4, Algorithm 1), or the smallest W1 "
        "radius at which the attack succeeds (--minimize: DeepFool-W1 steps and PGD at the "
        "budgets 0.05, 0.1, 0.2, 0.3, 0.5, 1.0 (doubled further where none succeeds), then "
        "their adversarials shrunk by a fast-minimum-norm search; 'inf' where it fails). "
        "Every success is re-checked by a forward pass on the returned image. Default threat "
        "model (the paper's): non-negative images of the input's mass, pixels not bounded "
        "above (see --clip-max). " + _UNITS,
    )
    p.add_argument("--model", required=True, help="bundled name (linear, fc, cnn), .onnx or .pt")
    p.add_argument(
        "--data",
        default="bundled",
        help="images: 'bundled' (500 bundled digits), .npz (x, optional y), MNIST IDX file or "
        "folder, or a PNG (default %(default)s)",
    )
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
    p.add_argument(
        "--loss",
        default="ce",
        help="adversarial loss: ce (cross-entropy, default, as the Python API), margin (the "
        "paper's f_y - max_t f_t; also 'cw') or dlr",
    )
    p.add_argument("--schedule", default="cosine", help="cosine (default) or constant")
    p.add_argument(
        "--restarts", type=int, default=0, help="random restarts for failures (default 0)"
    )
    p.add_argument(
        "--search-steps",
        type=int,
        default=6,
        help="--minimize: length of the shrinking search, in units of --steps "
        "(default 6: 6 x --steps iterations)",
    )
    p.add_argument(
        "--clip-max",
        type=float,
        default=None,
        help="pixel upper bound in data units (e.g. 1.0): a smaller threat set, labelled "
        "'w1+pixels<=U' in the records. Default: none, the paper's threat model (non-negative "
        "images of the input's mass), where adversarial pixels may exceed the data's range "
        "(each record gives the adversarial's 'max_pixel'; the summary notes it)",
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
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda or cuda:N (with --backend ray, each task asks for a quarter "
        "of a GPU)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="images per batch, also the unit of work given to a worker (results are those "
        "of a serial run with the same --batch-size); default 100",
    )
    p.add_argument(
        "--out",
        required=True,
        help="JSONL output, one record per (image, eps); an existing file written with the "
        "same options is resumed (images already recorded are skipped), see --overwrite",
    )
    p.add_argument(
        "--save-adversarial",
        default=None,
        metavar="FILE.npz",
        help="save the returned images: 'adversarial' (rows, C, H, W) in data units, "
        "'index' and 'eps' per row, plus 'success' and 'w1'; one row per record of --out, "
        "in the same order (also after a resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_runner_args(p)
    return p


def _config(args, attack, sel: np.ndarray) -> dict:
    from flowverify import __version__

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


def _attack_kwargs(args: argparse.Namespace, eps, reference) -> dict:
    """The :class:`~flowverify.attacks.pgd.WassersteinPGD` keywords of the command (no device)."""
    return {
        "eps": eps,
        "steps": args.steps,
        "step_size": args.step_size,
        "loss": args.loss,
        "schedule": args.schedule,
        "restarts": args.restarts,
        "search_steps": args.search_steps,
        "clip_max": args.clip_max,
        "input_scale": args.input_scale,
        "reference": reference,
        "fuse": args.fuse,
        "seed": args.seed,
    }


def _attack_work(batch: list[int], *, model: str, data: str, attack: dict, device: str, save: bool):
    """Attack the images ``batch`` of ``data`` (the runner's work function).

    Runs in a worker (or serially in the main process).  An exception on a batch of
    several images re-runs them one at a time, so that only the failing image gets
    ``status="error"`` records.  With ``save``, each record carries its adversarial image
    as an attachment (see :data:`flowverify.runner.ATTACH_KEY`).
    """
    import torch

    from flowverify.attacks.pgd import WassersteinPGD
    from flowverify.runner import ATTACH_KEY

    dev = torch.device(device)
    atk = WassersteinPGD(**attack, device=dev)
    x_all, y_all = _cached_data(data)
    idx = np.asarray(batch, dtype=np.int64)
    try:
        net = _cached_model(model).to(dev)
        res = atk(net, x_all[idx], None if y_all is None else np.asarray(y_all)[idx])
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        raise_if_interrupted(exc)
        if len(batch) > 1:
            kw = {"model": model, "data": data, "attack": attack, "device": device, "save": save}
            return [rec for i in batch for rec in _attack_work([i], **kw)]
        label = -1 if y_all is None else int(np.asarray(y_all)[batch[0]])
        return _attack_errors(batch[0], label, atk, exc)
    records = res.to_records(indices=idx)
    if save:
        for r, rec in enumerate(records):
            rec[ATTACH_KEY] = res.adversarial[r]
    return records


def _attack_errors(index: int, label: int, atk, exc: Exception) -> list[dict]:
    """The ``status="error"`` records of an image (one per budget), with every field of an
    attack record (``success`` false, distances null)."""
    text = str(exc).strip()
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    budgets = [None] if atk.eps is None else list(atk.eps)
    return [
        {
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
            "status": "error",
            "error": msg,
        }
        for eps in budgets
    ]


class _AdversarialStore:
    """``--save-adversarial FILE.npz``: one row per record of ``--out``, in its order.

    :meth:`save` (the runner's ``on_attachment``) writes the rows of an image to
    ``FILE.npz.parts/<index>.npy`` before its records are written; :meth:`assemble`
    rebuilds the npz from the records, taking each row from the parts or, for records of
    earlier runs, from the existing npz (matched by index, position among the image's
    rows, and budget), then removes the parts once the npz holds them all.
    """

    def __init__(self, path: str, images: np.ndarray):
        self.path = Path(path)
        self.parts = Path(f"{path}.parts")
        self.shape = tuple(images.shape[1:])
        self.dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float64
        self._previous: dict | None = None

    # -- writing parts (main process, signals deferred by the runner)

    def save(self, index: int, payloads: list) -> None:
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            rows = [self._blank() if p is None else np.asarray(p) for p in payloads]
            _save_array(str(self.parts / f"{index}.npy"), np.stack(rows))
        except OSError as exc:
            raise ValueError(
                f"--save-adversarial: cannot write {str(self.parts)!r} ({exc})"
            ) from None

    def clear_parts(self) -> None:
        if self.parts.is_dir():
            shutil.rmtree(self.parts, ignore_errors=True)

    def _blank(self) -> np.ndarray:
        return np.full(self.shape, np.nan, dtype=self.dtype)

    # -- reading back

    def _part(self, index: int) -> np.ndarray | None:
        path = self.parts / f"{index}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("--save-adversarial: ignoring the unreadable %s (%s)", path, exc)
            return None

    def _earlier(self) -> dict[tuple[int, int], tuple[float, np.ndarray]]:
        """``(index, k) -> (eps, image)`` of the rows of the existing npz."""
        if self._previous is not None:
            return self._previous
        out: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as d:
                    adv, index, eps = d["adversarial"], d["index"], d["eps"]
                seen: collections.Counter = collections.Counter()
                for r, i in enumerate(index.tolist()):
                    out[(int(i), seen[i])] = (float(eps[r]), adv[r])
                    seen[i] += 1
            except (OSError, ValueError, KeyError, IndexError) as exc:
                logger.warning(
                    "--save-adversarial: ignoring the unreadable %s (%s)", self.path, exc
                )
                out = {}
        self._previous = out
        return out

    def _rows(self, records: list[dict]) -> tuple[list[np.ndarray], list[int]]:
        """The image of every record (NaN for error records) and the indices lacking one."""
        rows, missing = [], []
        seen: collections.Counter = collections.Counter()
        parts: dict[int, np.ndarray | None] = {}
        for rec in records:
            i = int(rec["index"])
            k = seen[i]
            seen[i] += 1
            if rec.get("status") == "error":
                rows.append(self._blank())
                continue
            if i not in parts:
                parts[i] = self._part(i)
            part = parts[i]
            if part is not None and k < len(part) and part.shape[1:] == self.shape:
                rows.append(part[k])
                continue
            eps = _summary_float(rec.get("eps"))
            prev = self._earlier().get((i, k))
            if prev is not None and prev[1].shape == self.shape and _same(prev[0], eps):
                rows.append(prev[1])
                continue
            rows.append(self._blank())
            missing.append(i)
        return rows, missing

    def check(self, records: list[dict]) -> None:
        """Refuse (ValueError naming the flag) to resume records whose images are lost."""
        _, missing = self._rows(records)
        if missing:
            shown = ", ".join(map(str, sorted(set(missing))[:10]))
            raise ValueError(
                f"--save-adversarial: {str(self.path)!r} lacks the adversarial images of "
                f"{len(missing)} record(s) already in --out (indices {shown}); pass --overwrite "
                "to recompute them, or choose another --out"
            )

    def assemble(self, records: list[dict]) -> None:
        """Write the npz (atomically) from ``records``; drop the parts once it has them."""
        rows, missing = self._rows(records)
        adversarial = (
            np.stack(rows).astype(self.dtype, copy=False)
            if rows
            else np.zeros((0, *self.shape), dtype=self.dtype)
        )
        arrays = {
            "adversarial": adversarial,
            "index": np.array([int(r["index"]) for r in records], dtype=np.int64),
            "eps": np.array([_summary_float(r.get("eps")) for r in records], dtype=np.float64),
            "success": np.array([r.get("success") is True for r in records], dtype=bool),
            "w1": np.array([_summary_float(r.get("w1")) for r in records], dtype=np.float64),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._previous = None
        if missing:
            logger.warning(
                "--save-adversarial: %d row(s) without an image (NaN) in %s; kept %s",
                len(missing),
                self.path,
                self.parts,
            )
        else:
            self.clear_parts()


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _check_npz_path(path) -> str:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str) or not text:
        raise ValueError(f"--save-adversarial: expected a .npz file path, got {path!r}")
    if os.path.isdir(text):
        raise ValueError(f"--save-adversarial: {text!r} is a folder; expected a .npz file path")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--save-adversarial: cannot create {text!r}: {parent!r} is a file")
    return text


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify attack``; returns the exit code."""
    from flowverify.attacks.pgd import WassersteinPGD
    from flowverify.cli.runner_options import runner_errors_as_flags, runner_kwargs
    from flowverify.core.results import read_jsonl
    from flowverify.runner import WorkerCrashedError, existing_records, run_jobs

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
    _check_execution(args)
    device = args.device.strip()
    kwargs = _attack_kwargs(args, eps, reference)
    try:
        attack = WassersteinPGD(**kwargs, device=device)
    except (ValueError, TypeError) as exc:  # name the flag, not the keyword
        msg = str(exc)
        name = msg.split(":", 1)[0]
        raise type(exc)(f"--{name.replace('_', '-')}:{msg.split(':', 1)[1]}") from None
    npz = None if args.save_adversarial is None else _check_npz_path(args.save_adversarial)
    _, x_all, _, sel, data_spec, model_spec = _load_inputs(args)
    config = _config(args, attack, sel)
    with runner_errors_as_flags():
        kept = existing_records(args.out, config, resume=args.resume, overwrite=args.overwrite)
    store = None
    if npz is not None:
        store = _AdversarialStore(npz, x_all)
        if args.overwrite:
            store.clear_parts()
        else:
            store.check(kept)
    logger.info("attack: %r on %d images", attack, sel.size)
    work = functools.partial(
        _attack_work,
        model=model_spec,
        data=data_spec,
        attack=kwargs,
        device=device,
        save=store is not None,
    )
    try:
        with runner_errors_as_flags():
            records = run_jobs(
                sel.tolist(),
                work,
                out=args.out,
                config=config,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                desc="attack",
                ray_options=_ray_options(args),
                on_attachment=None if store is None else store.save,
                **runner_kwargs(args),
            )
    except (KeyboardInterrupt, WorkerCrashedError) as exc:
        # The runner left --out valid and in order: the npz follows it.
        if store is not None and os.path.exists(args.out):
            store.assemble(read_jsonl(args.out))
        if isinstance(exc, WorkerCrashedError):
            return _crashed("attack", exc)
        raise
    if store is not None:
        store.assemble(records)
    summary: dict[float, list[tuple[bool, float, float]]] = {}
    n_errors = 0
    peaks = []  # largest pixel of each successful adversarial
    for rec in records:
        if rec.get("status") == "error":
            n_errors += 1
            continue
        key = math.inf if eps is None else _summary_float(rec.get("eps"))
        success = rec.get("success") is True
        summary.setdefault(key, []).append(
            (success, _summary_float(rec.get("w1")), _summary_float(rec.get("seconds")))
        )
        if success and rec.get("max_pixel") is not None:
            peaks.append(_summary_float(rec.get("max_pixel")))
    # attack time of every record (earlier runs' included): per image in minimal mode
    seconds = sum(r[2] for rows in summary.values() for r in rows if math.isfinite(r[2]))
    _print_summary(summary, eps is None, attack.threat_model, seconds, args.out)
    data_max = float(np.max(x_all[sel])) if sel.size else math.nan
    _print_range_note(peaks, data_max, args.clip_max)
    if n_errors:
        print(f"{n_errors} error record(s) (status 'error', message under 'error')")
    return 0


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
