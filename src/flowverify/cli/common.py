"""Helpers shared by the ``certify`` and ``attack`` subcommands: checking their inputs,
loading the model and images once per process, running their work through the runner,
and writing and summarising their output.

Checks (before anything is written): :func:`check_execution` (the execution options,
``--out`` and ``--device``), :func:`check_device`, and :func:`load_inputs`, which loads
and checks ``--data``, ``--indices`` and ``--model``.  A bad value raises ``ValueError``
(or the type the loader raised) with a message led by the flag (:func:`renamed`); the
main program prints it on one line and exits with code 2.

Work (:mod:`flowverify.runner`): :func:`worker_spec` makes model and data specs that
workers in other folders can load; :func:`cached_model` / :func:`cached_data` load them
once per process; :func:`retry_alone` gives a failing batch's images their own tries, so
that only a failing image gets error records; :func:`existing_records_of` and
:func:`run_batches` call the runner with the command's flags, its errors reworded to name
them.

Output: :func:`save_array` (atomic ``np.save``), :func:`summary_float`,
:func:`error_text` and :func:`crashed` (the message and exit code of a crashed worker).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from flowverify.cli.runner_options import runner_errors_as_flags, runner_kwargs
from flowverify.core.interrupt import raise_if_interrupted

#: What the loaders raise for bad input (the main program reports them on one line).
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError)


# --------------------------------------------------------------------------- checks


def renamed(exc: BaseException, flag: str, names: Sequence[str] = ()) -> BaseException:
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


def check_device(text, *, local: bool = True, flag: str = "--device") -> str:
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


def check_execution(args: argparse.Namespace) -> None:
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
    check_device(args.device, local=args.backend != "ray" or args.address is None)


def check_masses(x_all: np.ndarray, sel: np.ndarray) -> None:
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


# --------------------------------------------------------------------------- inputs


def worker_spec(text: str, keep: Sequence[str]) -> str:
    """A model/data spec as workers should see it: names in ``keep`` as they are, an
    existing path made absolute (workers may run in another folder)."""
    text = str(text)
    if text in keep or not os.path.exists(text):
        return text
    return os.path.abspath(text)


@functools.lru_cache(maxsize=2)
def cached_data(spec: str):
    """``load_images(spec)``, once per process (main process and each worker)."""
    from flowverify.io.images import load_images

    return load_images(spec)


@functools.lru_cache(maxsize=2)
def cached_model(spec: str):
    """``load_model(spec)``, once per process (main process and each worker)."""
    from flowverify.model.loading import load_model

    return load_model(spec)


def model_input(model, x: np.ndarray):
    """Images ``x`` as a tensor ``model`` takes: its dtype and device, flattened to
    ``(N, C*H*W)`` when it starts with an ``nn.Linear``."""
    import torch

    from flowverify.model.flow_model import _infer_flat

    tensors = [*model.parameters(), *model.buffers()]
    param = next((t for t in tensors if t.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    inp = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)
    return inp.reshape(len(x), -1) if _infer_flat(model) else inp


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def num_classes(model, x: np.ndarray) -> int:
    """Run ``model`` on images ``x``; the number of classes, or a ValueError naming
    ``--model`` if it cannot take them or does not return ``(N, classes)`` logits."""
    import torch

    inp = model_input(model, x)
    try:
        with torch.no_grad():
            logits = model(inp)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(
            f"--model: the model cannot run on the --data images (input shape "
            f"{tuple(inp.shape)}): {first_line(exc)}"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else "a "
        got += "" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"--model: expected logits of shape (N, classes), got {got}")
    return int(logits.shape[1])


def load_inputs(args: argparse.Namespace):
    """Load and check ``--data``, ``--indices`` and ``--model``.

    Returns ``(model, x_all, y_all, sel, data_spec, model_spec)``: the model (on the CPU),
    every image and label of ``--data``, the selected indices and the specs workers load
    (cached: a serial run reuses what is loaded here).
    """
    from flowverify.io.indices import parse_indices
    from flowverify.model.zoo import BUNDLED_MODELS

    data_spec = worker_spec(args.data, ("bundled",))
    model_spec = worker_spec(args.model, tuple(BUNDLED_MODELS))
    try:
        x_all, y_all = cached_data(data_spec)
    except INPUT_ERRORS as exc:
        raise renamed(exc, "--data", ("path",)) from None
    try:
        sel = parse_indices(args.indices, x_all.shape[0])
    except (ValueError, TypeError) as exc:
        raise renamed(exc, "--indices", ("indices",)) from None
    check_masses(x_all, sel)
    try:
        model = cached_model(model_spec)
    except INPUT_ERRORS as exc:
        raise renamed(exc, "--model", ("model", "spec", "path")) from None
    classes = num_classes(model, x_all[sel[:1]])
    if y_all is not None:
        y_sel = np.asarray(y_all)[sel]
        bad = (y_sel < 0) | (y_sel >= classes)
        if bad.any():
            raise ValueError(
                f"--data: labels must be classes of the model in [0, {classes}), got "
                f"{sorted(set(y_sel[bad].tolist()))[:5]} (e.g. image {int(sel[bad][0])})"
            )
    return model, x_all, y_all, sel, data_spec, model_spec


# --------------------------------------------------------------------------- work


def retry_alone(
    work: Callable[[list[int]], list[dict]],
    batch: list[int],
    exc: Exception,
    labels,
    errors: Callable[[int, int, Exception], list[dict]],
) -> list[dict]:
    """The records of a batch whose work raised ``exc``: a batch of several images is
    re-run one image at a time (``work([i])``), so that only a failing image gets the
    ``status="error"`` records ``errors(index, label, exc)`` (label -1 without
    ``labels``).  An interruption is re-raised."""
    raise_if_interrupted(exc)
    if len(batch) > 1:
        return [rec for i in batch for rec in work([i])]
    label = -1 if labels is None else int(np.asarray(labels)[batch[0]])
    return errors(batch[0], label, exc)


def ray_options(args: argparse.Namespace) -> dict | None:
    """Ray task options: a quarter of a GPU per task with a CUDA ``--device``."""
    if args.backend == "ray" and str(args.device).strip().startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 0.25}
    return None


def existing_records_of(args: argparse.Namespace, config: dict) -> list[dict]:
    """The records of ``--out`` a run with ``config`` resumes (runner errors name flags)."""
    from flowverify.runner import existing_records

    with runner_errors_as_flags():
        return existing_records(args.out, config, resume=args.resume, overwrite=args.overwrite)


def run_batches(
    args: argparse.Namespace,
    sel: np.ndarray,
    work: Callable[[list[int]], list[dict]],
    config: dict,
    *,
    batch_size: int,
    desc: str,
    on_attachment: Callable[[int, list], None] | None = None,
) -> list[dict]:
    """Run ``work`` on the selected images ``sel`` with the command's execution options
    (:func:`flowverify.runner.run_jobs`, its errors naming flags), recording ``config``;
    every record of ``--out``, in input order.  A crashed worker raises
    ``WorkerCrashedError``."""
    from flowverify.runner import run_jobs

    with runner_errors_as_flags():
        return run_jobs(
            sel.tolist(),
            work,
            out=args.out,
            config=config,
            batch_size=batch_size,
            progress=not args.no_progress,
            desc=desc,
            ray_options=ray_options(args),
            on_attachment=on_attachment,
            **runner_kwargs(args),
        )


# --------------------------------------------------------------------------- output


def save_array(path: str, array: np.ndarray) -> None:
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


def summary_float(value) -> float:
    """``float(value)``, NaN for ``None`` and other non-numbers."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def error_text(exc: BaseException) -> str:
    """The message of an error record: ``Type: message`` (``Type`` alone if empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def crashed(command: str, exc: Exception) -> int:
    """Report a crashed worker (its first message line) on stderr; exit code 1."""
    print(f"flowverify {command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 1
