"""The ``flowverify certify`` subcommand: certified and exact W1 radii, one JSON per image.

Wiring (``flowverify.cli``): :func:`add_parser` adds the subcommand to the subparsers,
:func:`run` executes it and returns the exit code.  Bad input raises ``ValueError``,
``TypeError`` or ``FileNotFoundError`` naming the argument; the main CLI turns them into
one line on stderr and exit code 2.

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
one line naming the flag, with exit code 2, and leaves no output behind.  The helpers
here (``_check_execution``, ``_check_device``, ``_load_inputs``) serve ``attack`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np

from flowverify.core.interrupt import raise_if_interrupted

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
    from flowverify.cli.runner_options import add_runner_args
    from flowverify.verification import CERTIFIERS, METHODS

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
        "(default %(default)s; the paper's six: random:2,point:2,data:2). No radius "
        "depends on the reference (docs/REPRODUCTION.md): it is computed once, and the "
        "summary says so when several are given",
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per batch of the incomplete methods, and per unit of work given to a "
        "worker (results are those of a serial run with the same --batch-size; lower it to "
        "spread few images over many workers); default %(default)s",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random/point/data references")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of bound propagation: cpu (default), cuda or cuda:N (with "
        "--backend ray, each task asks for a quarter of a GPU)",
    )
    p.add_argument(
        "--witness-dir",
        default=None,
        help="write adversarial images to DIR/<index>.npy: exact results (the closest), "
        "falsified decisions, and for 'unknown' complete results the closest one found "
        "(W1 'upper'; not a proof that none is closer); the record's 'witness_kind' says "
        "which",
    )
    p.add_argument(
        "--out",
        required=True,
        help="JSONL output, one object per image; an existing file written with the same "
        "options is resumed (images already recorded are skipped), see --overwrite",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    smooth = p.add_argument_group(
        "smoothing (--method smoothing: Levine & Feizi's Wasserstein smoothing; the model is "
        "the base classifier, trained with this noise)"
    )
    smooth.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level: standard deviation of one flow coordinate of the normalised image "
        "(Laplace scale sigma/sqrt(2)); required by --method smoothing",
    )
    smooth.add_argument(
        "--n0", type=int, default=1000, help="selection samples per image (default %(default)s)"
    )
    smooth.add_argument(
        "--n-samples",
        type=int,
        default=10000,
        help="estimation samples per image (default %(default)s)",
    )
    smooth.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="failure probability of each certificate (default %(default)s)",
    )
    add_runner_args(p)
    return p


def _config(args, certifier: str, labels_from: str) -> dict:
    from flowverify import __version__

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
        **(
            {"sigma": args.sigma, "n0": args.n0, "n_samples": args.n_samples, "alpha": args.alpha}
            if args.method == "smoothing"
            else {}
        ),
    }


# --------------------------------------------------------------------------- checks
# Shared with ``flowverify attack`` (:mod:`flowverify.cli.attack_cmd`).


def _renamed(exc: BaseException, flag: str, names: Sequence[str] = ()) -> BaseException:
    """``exc`` with its message led by ``flag``: a leading ``name:`` in ``names`` is
    replaced, other messages are prefixed.  The type is kept (FileNotFoundError stays one)."""
    msg = (str(exc.args[0]) if len(exc.args) == 1 else str(exc)).strip()
    msg = msg or type(exc).__name__
    head, sep, rest = msg.partition(":")
    if sep and head.strip() in names:
        msg = f"{flag}:{rest}"
    elif not msg.startswith(flag):
        msg = f"{flag}: {msg}"
    try:
        return type(exc)(msg)
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return ValueError(msg)


def _check_device(text, *, local: bool = True, flag: str = "--device") -> str:
    """Check a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N``, the latter available
    here when ``local`` (a remote Ray cluster has its own GPUs).  Returns it, stripped."""
    import torch

    expected = "expected cpu, cuda or cuda:N"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{flag}: {expected}, got {text!r}")
    text = text.strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag}: unknown device {text!r}; {expected}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: {expected}, got {text!r}")
    if dev.type == "cuda" and local:
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag}: {text!r} was asked for, but no CUDA device is available here "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not compiled in'}); "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag}: {text!r} does not exist; {count} CUDA device(s) here")
    return text


def _check_execution(args: argparse.Namespace) -> None:
    """The execution options (``--workers`` ... ``--out``) and ``--device``; no file touched."""
    workers = args.workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers: expected an int >= 0 (0: every CPU), got {workers!r}")
    if args.backend not in ("local", "ray"):
        raise ValueError(f"--backend: expected local or ray, got {args.backend!r}")
    if args.address is not None:
        if args.backend != "ray":
            raise ValueError("--address: only used with --backend ray")
        if not str(args.address).strip():
            raise ValueError("--address: expected 'auto', 'ray://host:port' or 'host:port'")
    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(
            "--backend: 'ray' needs the optional package ray: pip install 'flowverify[ray]'"
        )
    out = args.out
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"--out: expected a file path, got {out!r}")
    if os.path.isdir(out):
        raise ValueError(f"--out: {os.fspath(out)!r} is a folder; expected a .jsonl file path")
    _check_device(args.device, local=args.backend != "ray" or args.address is None)


def _ray_options(args: argparse.Namespace) -> dict | None:
    """Ray task options: a quarter of a GPU per task with a CUDA ``--device``."""
    if args.backend == "ray" and str(args.device).strip().startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 0.25}
    return None


def _spec(text: str, keep: Sequence[str]) -> str:
    """A model/data spec as workers should see it: names in ``keep`` as they are, an
    existing path made absolute (workers may run in another folder)."""
    text = str(text)
    if text in keep or not os.path.exists(text):
        return text
    return os.path.abspath(text)


@functools.lru_cache(maxsize=2)
def _cached_data(spec: str):
    """``load_images(spec)``, once per process (main process and each worker)."""
    from flowverify.io.images import load_images

    return load_images(spec)


@functools.lru_cache(maxsize=2)
def _cached_model(spec: str):
    """``load_model(spec)``, once per process (main process and each worker)."""
    from flowverify.model.loading import load_model

    return load_model(spec)


def _num_classes(model, x: np.ndarray) -> int:
    """Run ``model`` on images ``x``; the number of classes, or a ValueError naming
    ``--model`` if it cannot take them or does not return ``(N, classes)`` logits."""
    import torch

    from flowverify.model.flow_model import _infer_flat

    tensors = [*model.parameters(), *model.buffers()]
    param = next((t for t in tensors if t.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    inp = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)
    try:
        if _infer_flat(model):
            inp = inp.reshape(len(x), -1)
        with torch.no_grad():
            logits = model(inp)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"--model: the model cannot run on the --data images (input shape "
            f"{tuple(inp.shape)}): {reason}"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else "a "
        got += "" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"--model: expected logits of shape (N, classes), got {got}")
    return int(logits.shape[1])


def _load_inputs(args: argparse.Namespace):
    """Load and check ``--data``, ``--indices`` and ``--model``.

    Returns ``(model, x_all, y_all, sel, data_spec, model_spec)``: the model (on the CPU),
    every image and label of ``--data``, the selected indices and the specs workers load
    (cached: a serial run reuses what is loaded here).
    """
    from flowverify.io.indices import parse_indices
    from flowverify.model.zoo import BUNDLED_MODELS

    data_spec = _spec(args.data, ("bundled",))
    model_spec = _spec(args.model, tuple(BUNDLED_MODELS))
    try:
        x_all, y_all = _cached_data(data_spec)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise _renamed(exc, "--data", ("path",)) from None
    try:
        sel = parse_indices(args.indices, x_all.shape[0])
    except (ValueError, TypeError) as exc:
        raise _renamed(exc, "--indices", ("indices",)) from None
    _check_masses(x_all, sel)
    try:
        model = _cached_model(model_spec)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise _renamed(exc, "--model", ("model", "spec", "path")) from None
    classes = _num_classes(model, x_all[sel[:1]])
    if y_all is not None:
        y_sel = np.asarray(y_all)[sel]
        bad = (y_sel < 0) | (y_sel >= classes)
        if bad.any():
            raise ValueError(
                f"--data: labels must be classes of the model in [0, {classes}), got "
                f"{sorted(set(y_sel[bad].tolist()))[:5]} (e.g. image {int(sel[bad][0])})"
            )
    return model, x_all, y_all, sel, data_spec, model_spec


def _check_masses(x_all: np.ndarray, sel: np.ndarray) -> None:
    """ValueError naming ``--data`` if a selected image has a channel of mass 0: W1
    compares distributions, so such an image cannot be certified or attacked."""
    with np.errstate(over="ignore"):
        mass = np.asarray(x_all[sel], dtype=np.float64).sum(axis=(-2, -1))
    bad = np.flatnonzero((mass <= 0).any(axis=1))
    if bad.size:
        first = int(sel[bad[0]])
        raise ValueError(
            f"--data: image {first} is all zero (a channel of mass 0; {bad.size} such "
            f"image(s) selected): W1 needs positive mass; leave them out with --indices"
        )


#: Messages of :func:`flowverify.verification.api.check_certifiable` -> the flags.
_API_FLAGS = {
    "model": "--model",
    "method": "--method",
    "certifier": "--certifier",
    "images": "--data",
    "input_scale": "--input-scale",
}


def _check_certifiable(model, x: np.ndarray, method: str, certifier: str, scale: str) -> None:
    """Refuse, once and before any work, a model the method cannot certify (naming the
    layer or operator), instead of an error record per image."""
    from flowverify.verification.api import check_certifiable

    try:
        check_certifiable(model, x, method=method, certifier=certifier, input_scale=scale)
    except (ValueError, TypeError) as exc:
        head = str(exc).partition(":")[0].strip()
        flag = _API_FLAGS.get(head, "--model")
        raise _renamed(exc, flag, (head,)) from None


#: Runner argument names in messages -> the flags that set them.
def _save_array(path: str, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _summary_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _crashed(command: str, exc: Exception) -> int:
    print(f"flowverify {command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- work


def _certify_work(batch: list[int], **kw) -> list[dict]:
    """Certify the images ``batch`` of ``kw["data"]`` (the runner's work function).

    Runs in a worker (or serially in the main process).  An exception on a batch of
    several images re-runs them one at a time, so that only the failing image gets a
    ``status="error"`` record.  Witnesses travel back as attachments when
    ``kw["witness_dir"]`` is set.
    """
    from flowverify.api import certify, iter_certify
    from flowverify.runner import ATTACH_KEY

    model = _cached_model(kw["model"])
    x_all, y_all = _cached_data(kw["data"])
    idx = np.asarray(batch, dtype=np.int64)
    try:
        if kw["method"] == "smoothing":
            smooth = kw["smoothing"]
            results = certify(
                model,
                x_all[idx],
                None if y_all is None else np.asarray(y_all)[idx],
                method="smoothing",
                device=kw["device"],
                seed=kw["seed"],
                indices=idx,
                **smooth,
            )
        else:
            with warnings.catch_warnings():  # the CLI's summary states it once
                warnings.filterwarnings("ignore", message="references: ")
                results = list(
                    iter_certify(
                        model,
                        x_all[idx],
                        None if y_all is None else np.asarray(y_all)[idx],
                        method=kw["method"],
                        certifier=kw["certifier"],
                        references=kw["references"],
                        eps=kw["eps"],
                        unit=kw["unit"],
                        input_scale=kw["input_scale"],
                        timeout=kw["timeout"],
                        device=kw["device"],
                        seed=kw["seed"],
                        data=x_all,
                        indices=idx,
                        batch_size=max(len(idx), 1),
                        rtol=kw["rtol"],
                        progress=False,
                    )
                )
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        raise_if_interrupted(exc)
        if len(batch) > 1:
            return [rec for i in batch for rec in _certify_work([i], **kw)]
        label = -1 if y_all is None else int(np.asarray(y_all)[batch[0]])
        return [_certify_error(batch[0], label, kw["method"], kw["certifier"], exc)]
    records = []
    for res in results:
        rec = res.to_dict()
        if kw["witness_dir"] and res.witness is not None:
            rec["witness_path"] = os.path.join(kw["witness_dir"], f"{res.index}.npy")
            rec[ATTACH_KEY] = np.asarray(res.witness, dtype=np.float64)
        records.append(rec)
    return records


def _certify_error(index: int, label: int, method: str, certifier: str, exc: Exception) -> dict:
    """The ``status="error"`` record of an image: every field of a certify record."""
    from flowverify.core.results import Status
    from flowverify.verification import CertifyResult

    text = str(exc).strip()
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
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
    return {**res.to_dict(), "error": msg}


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Run ``flowverify certify``; write the JSONL file; return the exit code."""
    from flowverify.cli.runner_options import runner_errors_as_flags, runner_kwargs
    from flowverify.core.results import Status
    from flowverify.runner import WorkerCrashedError, existing_records, run_jobs
    from flowverify.transport.references import parse_references
    from flowverify.verification import CERTIFIERS, references_note

    # Every check comes before anything is written.
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
        if args.sigma is None or not (np.isfinite(args.sigma) and args.sigma > 0):
            raise ValueError(
                f"--sigma: --method smoothing needs a noise level > 0, got {args.sigma}"
            )
        if args.n0 < 1 or args.n_samples < 1:
            raise ValueError(
                f"--n0, --n-samples: expected positive sample counts, got {args.n0}, "
                f"{args.n_samples}"
            )
        if not (0 < args.alpha < 1):
            raise ValueError(f"--alpha: expected a probability in (0, 1), got {args.alpha}")
        if args.eps is not None:
            raise ValueError("--eps: fixed-radius decisions are not available for smoothing")
        if args.input_scale != "raw":
            raise ValueError("--input-scale: smoothing base nets consume raw images ('raw')")
    elif args.sigma is not None:
        raise ValueError("--sigma: only used by --method smoothing")
    if args.witness_dir is not None and (
        not str(args.witness_dir) or os.path.isfile(args.witness_dir)
    ):
        raise ValueError(f"--witness-dir: expected a folder, got {str(args.witness_dir)!r}")
    _check_execution(args)
    model, x_all, y_all, sel, data_spec, model_spec = _load_inputs(args)
    _check_certifiable(model, x_all[sel[:1]], args.method, certifier, args.input_scale)
    try:
        refs = parse_references(
            args.references, data=x_all, exclude_index=int(sel[0]), seed=int(args.seed)
        )
    except (ValueError, TypeError) as exc:
        raise _renamed(exc, "--references", ("references",)) from None
    ref_note = references_note(args.method, certifier, len(refs))
    config = _config(args, certifier, "data" if y_all is not None else "model predictions")
    with runner_errors_as_flags():
        existing_records(args.out, config, resume=args.resume, overwrite=args.overwrite)

    witness_dir = None if args.witness_dir is None else str(args.witness_dir)
    on_attachment = None
    if witness_dir is not None:
        try:
            os.makedirs(witness_dir, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--witness-dir: cannot create {witness_dir!r} ({exc})") from None

        def on_attachment(index: int, payloads: list) -> None:
            path = os.path.join(witness_dir, f"{index}.npy")
            for arr in payloads:
                if arr is not None:
                    try:
                        _save_array(path, arr)
                    except OSError as exc:
                        raise ValueError(f"--witness-dir: cannot write {path!r} ({exc})") from None

    work = functools.partial(
        _certify_work,
        model=model_spec,
        data=data_spec,
        method=args.method,
        certifier=certifier,
        references=args.references,
        eps=args.eps,
        unit=args.unit,
        input_scale=args.input_scale,
        timeout=args.timeout,
        device=args.device.strip(),
        seed=int(args.seed),
        rtol=args.rtol,
        witness_dir=witness_dir,
        smoothing={
            "sigma": args.sigma,
            "n0": args.n0,
            "n_samples": args.n_samples,
            "alpha": args.alpha,
        },
    )
    del model  # loaded and cached for the serial path; workers load their own
    t0 = time.perf_counter()
    try:
        with runner_errors_as_flags():
            records = run_jobs(
                sel.tolist(),
                work,
                out=args.out,
                config=config,
                batch_size=1 if args.method.startswith("complete") else args.batch_size,
                progress=not args.no_progress,
                desc=f"certify {args.method}",
                ray_options=_ray_options(args),
                on_attachment=on_attachment,
                **runner_kwargs(args),
            )
    except WorkerCrashedError as exc:
        return _crashed("certify", exc)
    counts: dict[str, int] = {}
    radii = []
    for rec in records:
        status = str(rec.get("status"))
        counts[status] = counts.get(status, 0) + 1
        if status not in (Status.MISCLASSIFIED.value, Status.ERROR.value):
            radii.append(_summary_float(rec.get("radius")))
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
