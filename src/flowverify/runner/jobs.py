"""Orchestration of a run: :func:`run_jobs` drives per-image work through a backend into
a resumable JSONL file.

:func:`run_jobs` checks its arguments, cuts the image indices into fixed batches, runs a
*work function* on them serially, on local worker processes (:mod:`.local`), or as Ray
tasks (:mod:`.ray_backend`), and records its results in a JSONL file that survives
interruption (reading back an existing file: :mod:`.records`; writing: :mod:`.output`):

* **Per batch, all or nothing.**  All records of one batch are written with one
  ``write`` system call (and ``fsync``), as soon as they are known (completion order),
  with SIGINT/SIGTERM deferred around the write.  An image is thus either fully recorded
  or absent; the only damage a hard kill (SIGKILL, power loss) can leave is a trailing
  partial line, which is dropped when the file is read back.
* **Fixed batches.**  Batches are consecutive runs of ``batch_size`` indices of
  ``indices`` (the same whatever the number of workers); a resumed run leaves out the
  images already recorded, so an interrupted batch is re-run whole, as in the
  uninterrupted run.  Batched computations (whose floating-point rounding may depend on
  the other images of the batch) thus give the same records as the serial run.
* **Order restored.**  At the end (also after an interruption) the file is rewritten
  atomically (temporary file, ``fsync``, ``os.replace``) with the images in input order,
  so the output is identical to a serial run whatever the number of workers.
* **Resume.**  If the output exists, its complete records are read back; their ``config``
  must equal the run's ``config`` up to the keys in :data:`NEUTRAL_CONFIG_KEYS` (options
  that do not change results), otherwise the run is refused with a ValueError naming
  ``out`` and the differing keys.  Images already recorded are skipped (``error``
  records included: they are results; ``overwrite=True`` starts afresh).  Records of one
  image that are not consecutive in the file (e.g. a file written by an older version,
  budget-major) are gathered, never dropped.  Only one run at a time may write a given
  file (an advisory lock next to it; POSIX only).  :func:`existing_records` returns the
  records a run would keep, with the same checks, without running anything.
* **Nothing left behind on failure.**  The backend is started before the output is
  opened: a run that cannot start (Ray unreachable, unpicklable work) leaves the output
  untouched; a new output in which nothing was recorded is removed when the run fails.
* **Errors.**  An exception escaping ``work`` is caught in the worker and every image of
  the batch gets an ``{"index": i, "status": "error", "error": "Type: message"}``
  record; the run goes on.  Work functions should catch per image themselves, so that
  one bad image does not spoil its batch.
* **Crashed workers.**  A worker process that dies (segfault, out-of-memory killer,
  ``kill -9``) takes no record with it: the batches it may have held are re-run one at a
  time on a fresh pool to find the culprit, whose images are left **unrecorded** (so a
  resume re-runs them rather than freezing a transient failure into an ``error``
  record).  After the run, :class:`WorkerCrashedError` names them.  After
  ``max_worker_failures`` such batches, the run stops early.
* **Interruption.**  SIGINT or SIGTERM in the main process: submission stops, pending
  work is cancelled, worker processes are terminated, the file is put in input order and
  ``KeyboardInterrupt`` propagates (the CLI exits with code 130).  Local workers ignore
  SIGINT (the main process decides) and exit by themselves if the main process dies.

Work functions
--------------
``work(batch: list[int]) -> list[dict]`` gets a batch of indices and returns the records
of these images (each a dict with an ``"index"`` key; one or more per image).  With
``workers > 1`` or ``backend="ray"`` it must be picklable: a module-level function or a
``functools.partial`` of one with picklable arguments (a model spec string, a data path,
hyperparameters), loading heavy objects inside the worker (``functools.lru_cache`` on
the loader keeps them across the batches a worker process runs).  For results identical
to the serial run, a record must depend only on its batch (seed randomness from the
image index or the batch, not from the position in the run).  The runner sets
``record["config"] = config`` on every record.

Attachments: a record may carry arrays that do not belong in the JSONL (an adversarial
image, a witness) under the key :data:`ATTACH_KEY`.  The runner removes them from the
record in the worker, ships them back to the main process (also from a remote Ray
node), and calls ``on_attachment(index, payloads)`` there for each image of a finished
batch, before its records are written (``payloads`` is aligned with the image's
records, ``None`` for a record without one).  Whatever ``on_attachment`` saves is thus on
disk whenever the record is.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowverify.core.results import Status
from flowverify.runner.batch import _Lost, _Result
from flowverify.runner.local import _LocalPool, _Serial
from flowverify.runner.output import _Appender, _atomic_write, _exclusive
from flowverify.runner.ray_backend import _RayTasks
from flowverify.runner.records import _check_out, _kept_groups, _normalise_config
from flowverify.runner.signals import _Signals

__all__ = ["BACKENDS", "WorkerCrashedError", "run_jobs"]

logger = logging.getLogger(__name__)

#: Execution backends of :func:`run_jobs`.
BACKENDS = ("local", "ray")


class WorkerCrashedError(RuntimeError):
    """Worker processes died while holding images; those images were left unrecorded.

    Attributes
    ----------
    indices : list of int
        The images without a record (re-running the same command retries them).
    """

    def __init__(self, message: str, indices: Sequence[int]):
        super().__init__(message)
        self.indices = list(indices)


def _check_indices(indices: Sequence[int]) -> list[int]:
    """The indices as Python ints, repetitions dropped (first occurrence kept)."""
    if isinstance(indices, (str, bytes, Mapping)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"indices: expected a sequence of ints, got {type(indices).__name__}")
    items = list(indices)
    out: list[int] = []
    seen: set[int] = set()
    for i in items:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"indices: expected ints, got {i!r} ({type(i).__name__})")
        i = int(i.__index__())
        if i not in seen:
            seen.add(i)
            out.append(i)
    if len(out) < len(items):
        logger.warning("indices: %d repeated indices run once", len(items) - len(out))
    return out


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value.__index__())
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def run_jobs(
    indices: Sequence[int],
    work: Callable[[list[int]], list[dict]],
    *,
    out: str | os.PathLike,
    config: Mapping,
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    batch_size: int = 1,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "",
    ray_options: Mapping | None = None,
    max_worker_failures: int = 3,
    on_attachment: Callable[[int, list], None] | None = None,
) -> list[dict]:
    """Run ``work`` over ``indices`` and record the results in a resumable JSONL file.

    Parameters
    ----------
    indices : sequence of int
        Image indices, in output order (repetitions run once).
    work : callable
        ``work(batch) -> records``: a list of dicts with an ``"index"`` key (one or more per
        image of ``batch``).  Picklable when run on workers (see the module docstring).
    out : str or path-like
        The JSONL output.
    config : mapping
        The resolved, JSON-serialisable configuration of the run, stored in every record
        (``record["config"]``) and compared, up to :data:`NEUTRAL_CONFIG_KEYS`, with the
        records of an existing ``out`` before resuming it.
    workers : int, optional
        Concurrent workers: local processes, or Ray tasks in flight; 0 means every CPU
        (of this machine, or of the Ray cluster).  Default 1: serial, in this process.
    backend : {"local", "ray"}, optional
        Local processes (``forkserver``/``spawn``, one thread each) or Ray tasks.
    address : str, optional
        Ray address (``"auto"``, ``"ray://host:port"``, ...); ``None`` starts a local Ray
        instance on loopback (and shuts it down afterwards).  Ray only.
    batch_size : int, optional
        Indices per call of ``work``: ``indices`` cut into consecutive runs of
        ``batch_size`` (fixed, whatever the workers; a resumed run leaves out the images
        already recorded).  Default 1.
    resume : bool, optional
        Continue an existing ``out``: skip the images it records.  Default True.
    overwrite : bool, optional
        Discard an existing ``out`` and start afresh.  Default False.
    progress : bool, optional
        Show a tqdm progress bar on stderr.  Default True.
    desc : str, optional
        Label of the progress bar.
    ray_options : mapping, optional
        Extra ``ray.remote`` options per task, e.g. ``{"num_gpus": 0.25}`` (Ray hides
        the GPUs from tasks that do not ask for one).  Default ``{"num_cpus": 1}``.
    max_worker_failures : int, optional
        Stop the run after this many batches whose worker process died.  Default 3.
    on_attachment : callable, optional
        ``on_attachment(index, payloads)``, called in this process with the
        :data:`ATTACH_KEY` payloads of each image of a finished batch (aligned with its
        records, ``None`` for a record without one) before the batch's records are
        written, with SIGINT/SIGTERM deferred.  Exceptions it raises stop the run.
        Without it, attachments are dropped.

    Returns
    -------
    list of dict
        Every record of ``out`` (earlier ones included), as written, in input order.

    Raises
    ------
    ValueError
        A bad argument (named), an existing ``out`` without ``resume``/``overwrite``, an
        ``out`` written with a different config, or one being written by another process.
    TypeError
        An argument of the wrong type, or a ``work`` that cannot be pickled for workers.
    WorkerCrashedError
        Worker processes died holding images; those are unrecorded (resume retries them).
    KeyboardInterrupt
        On SIGINT or SIGTERM, after the output was left valid and in order.
    """
    asked = _check_indices(indices)
    if not callable(work):
        raise TypeError(f"work: expected a callable, got {type(work).__name__}")
    path = _check_out(out)
    cfg = _normalise_config(config)
    workers = _check_int(workers, "workers", 0)
    batch_size = _check_int(batch_size, "batch_size", 1)
    max_worker_failures = _check_int(max_worker_failures, "max_worker_failures", 1)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if address is not None and backend != "ray":
        raise ValueError(f"address: only used with backend='ray', got backend={backend!r}")
    if ray_options is not None and not isinstance(ray_options, Mapping):
        raise TypeError(f"ray_options: expected a mapping, got {type(ray_options).__name__}")
    if on_attachment is not None and not callable(on_attachment):
        raise TypeError(
            f"on_attachment: expected a callable or None, got {type(on_attachment).__name__}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out: cannot create the folder of {str(path)!r} ({exc})") from None

    with _exclusive(path):
        existed = path.exists()
        groups = _kept_groups(path, cfg, resume=resume, overwrite=overwrite, repair=True)
        recorded = dict(groups)
        before = len(recorded)
        todo = [i for i in asked if i not in recorded]
        if before:
            logger.info("%s: %d images already recorded, %d to run", path, before, len(todo))
        asked_set = set(asked)
        # output order: earlier images not asked for now (file order), then `indices`
        order = [*(i for i in recorded if i not in asked_set), *asked]
        # fixed batches of `indices`, less the images already recorded
        batches = [
            b
            for k in range(0, len(asked), batch_size)
            if (b := [i for i in asked[k : k + batch_size] if i not in recorded])
        ]
        return _execute(
            batches,
            order,
            recorded,
            work,
            path=path,
            cfg=cfg,
            workers=workers,
            backend=backend,
            address=address,
            truncate=overwrite or not groups,
            existed=existed,
            progress=progress,
            desc=desc,
            ray_options=ray_options,
            max_failures=max_worker_failures,
            on_attachment=on_attachment,
        )


def _execute(
    todo_batches: list[list[int]],
    order: list[int],
    recorded: dict[int, str],
    work: Callable,
    *,
    path: Path,
    cfg: dict,
    workers: int,
    backend: str,
    address: str | None,
    truncate: bool,
    existed: bool,
    progress: bool,
    desc: str,
    ray_options: Mapping | None,
    max_failures: int,
    on_attachment: Callable[[int, list], None] | None,
) -> list[dict]:
    from tqdm import tqdm

    pos = {i: k for k, i in enumerate(order)}
    batches = collections.deque(todo_batches)
    todo = [i for b in todo_batches for i in b]
    before = len(recorded)
    signals = _Signals()
    executor: Any = None
    inflight: dict[Any, list[int]] = {}
    failed: list[list[int]] = []
    suspects: collections.deque[list[int]] = collections.deque()
    isolated: Any = None  # the handle of a suspect batch running alone after a crash
    n_errors = 0
    window = 0
    interrupted = failed_run = False
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(order),
        initial=len(order) - len(todo),
        desc=desc or None,
        unit="img",
        file=sys.stderr,
        disable=not progress or not todo,
        leave=False,
        dynamic_ncols=True,
    )
    appender: _Appender | None = None

    def record(batch: list[int], result: _Result) -> None:
        nonlocal n_errors
        texts, attached = result
        with signals.critical():
            if on_attachment is not None:  # on disk before the records that need it
                for i in batch:
                    if i in attached:
                        on_attachment(i, attached[i])
            appender.write("".join(texts[i] for i in batch))  # one write: all or nothing
            appender.sync()
            for i in batch:
                recorded[i] = texts[i]
        n_err = sum(f'"status": "{Status.ERROR.value}"' in texts[i] for i in batch)
        if n_err:
            n_errors += n_err
            logger.warning("images %s: %d error record(s)", batch, n_err)
        bar.update(len(batch))

    signals.install()
    try:
        if batches:
            n = workers or _cpu_count()
            if backend == "ray":
                executor = _RayTasks(work, cfg, workers, address, ray_options)
            elif min(n, len(batches)) <= 1:
                executor = _Serial(work, cfg)
            else:
                executor = _LocalPool(work, cfg, min(n, len(batches)))
            logger.info(
                "running %d images in %d batches on %s (%d at a time)",
                len(todo),
                len(batches),
                executor.name,
                executor.concurrency,
            )
            # Keep workers busy while results travel back; serially, record each batch
            # as soon as it is computed.
            window = 1 if isinstance(executor, _Serial) else 2 * executor.concurrency
        # Opened once the backend is up: a run that cannot start leaves the file as it was.
        appender = _Appender(path, truncate=truncate)
        while True:
            if len(failed) < max_failures:
                if suspects:  # after a crash: re-run the suspects one at a time
                    if not inflight:
                        b = suspects.popleft()
                        isolated = executor.submit(b)
                        inflight[isolated] = b
                else:
                    while batches and len(inflight) < window:
                        b = batches.popleft()
                        inflight[executor.submit(b)] = b
            if not inflight:
                break
            for handle in executor.wait(list(inflight)):
                batch = inflight.pop(handle)
                try:
                    result = executor.result(handle)
                except _Lost as exc:
                    if exc.shared and handle is not isolated:
                        # The pool died with several batches in it: any could be the cause.
                        lost = [batch]
                        for h, b in list(inflight.items()):
                            done = executor.finished(h)
                            if done is None:
                                lost.append(b)
                            else:
                                record(b, done)
                        inflight.clear()
                        suspects = collections.deque(
                            sorted([*suspects, *lost], key=lambda b: pos[b[0]])
                        )
                        logger.warning("%s; re-running its batches one at a time", exc)
                        executor.restart()
                        break
                    logger.error("%s while running images %s; left unrecorded", exc, batch)
                    failed.append(batch)
                    if exc.shared:
                        executor.restart()
                    continue
                record(batch, result)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException:
        failed_run = True
        raise
    finally:
        bar.close()
        if executor is not None:
            if interrupted or inflight:
                executor.abort(list(inflight))
            with contextlib.suppress(Exception):
                executor.close()
        if appender is not None:
            appender.close()
            with signals.critical():
                if (failed_run or interrupted) and not existed and not recorded:
                    with contextlib.suppress(OSError):  # a new, empty output: none at all
                        path.unlink()
                else:
                    _atomic_write(path, [recorded[i] for i in order if i in recorded])
        signals.restore()
        if interrupted:
            logger.warning(
                "interrupted: %d of %d images recorded in %s; re-run the same command to resume",
                len(recorded),
                len(order),
                path,
            )
    logger.info(
        "%d images recorded in %s (%d new, %d error records) in %.1f s",
        len(recorded),
        path,
        len(recorded) - before,
        n_errors,
        time.perf_counter() - t0,
    )
    missing = [i for b in (*failed, *suspects, *batches) for i in b]
    if missing:
        missing.sort(key=pos.__getitem__)
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        stopped = " (stopped early: too many crashes)" if batches or suspects else ""
        raise WorkerCrashedError(
            f"worker processes died while running {len(failed)} batch(es){stopped}; "
            f"{len(missing)} image(s) were left unrecorded in {str(path)!r} (indices {shown}); "
            "re-run the same command to retry them",
            missing,
        )
    return [json.loads(line) for i in order if i in recorded for line in recorded[i].splitlines()]
