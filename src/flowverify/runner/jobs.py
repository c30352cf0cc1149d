"""Parallel, distributed and resumable execution of per-image work.

:func:`run_jobs` runs a *work function* over image indices, serially, on local worker
processes, or as Ray tasks, and records its results in a JSONL file that survives
interruption:

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
  ``--out`` and the differing keys.  Images already recorded are skipped (``error``
  records included: they are results; ``--overwrite`` starts afresh).  Records of one
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

import argparse
import collections
import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.core.results import Status, jsonable

try:  # POSIX advisory locks; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ATTACH_KEY",
    "BACKENDS",
    "NEUTRAL_CONFIG_KEYS",
    "WorkerCrashedError",
    "add_runner_args",
    "config_differences",
    "config_from_args",
    "existing_records",
    "run_jobs",
    "runner_kwargs",
]

logger = logging.getLogger(__name__)

#: Execution backends of :func:`run_jobs`.
BACKENDS = ("local", "ray")

#: Record key of the arrays a work function hands to ``on_attachment`` (see the module
#: docstring); never written to the JSONL.
ATTACH_KEY = "__attachment__"

#: Config keys that do not change results: ignored when a run resumes a file written with
#: another value (how the work is spread, where it is written, how it is shown, and which
#: images are asked for, or how many: records depend on their own image only).
NEUTRAL_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "workers",
        "backend",
        "address",
        "resume",
        "overwrite",
        "out",
        "progress",
        "verbose",
        "quiet",
        "indices",
        "n_images",
    }
)

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))


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


# --------------------------------------------------------------------------- config


def _normalise_config(config: Mapping) -> dict[str, Any]:
    """``config`` as it reads back from JSON (tuples -> lists, numpy -> Python, ...)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a mapping (dict), got {type(config).__name__}")
    try:
        return json.loads(json.dumps(jsonable(dict(config)), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: expected JSON-serialisable values ({exc})") from None


def config_differences(
    recorded: Mapping, current: Mapping, *, ignore: frozenset[str] = NEUTRAL_CONFIG_KEYS
) -> list[str]:
    """Keys whose values differ between two configs, ignoring ``ignore``.

    Parameters
    ----------
    recorded, current : mapping
        Configs as read from a file and as given now (both JSON-normalised first).
    ignore : frozenset of str
        Keys that do not change results, default :data:`NEUTRAL_CONFIG_KEYS`.

    Returns
    -------
    list of str
        Sorted differing keys (present in one only, or with different values).
    """
    a, b = _normalise_config(recorded), _normalise_config(current)
    keys = (a.keys() | b.keys()) - ignore
    return sorted(k for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = "<missing>"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if value is not _MISSING else "(absent)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_from_args(args: argparse.Namespace, *, drop: Sequence[str] = ("func",)) -> dict:
    """The resolved config of a CLI run: ``vars(args)`` without callables and ``drop``."""
    return {k: v for k, v in vars(args).items() if k not in drop and not callable(v)}


# --------------------------------------------------------------------------- CLI glue


def add_runner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the execution options shared by ``certify`` and ``attack``.

    ``--workers N`` (default 1; 0 = every CPU), ``--backend local|ray``, ``--address``
    (Ray), ``--resume/--no-resume`` (default on) and ``--overwrite``.  Pass the parsed
    namespace through :func:`runner_kwargs` to :func:`run_jobs`.
    """
    g = parser.add_argument_group("execution")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="parallel workers: local processes, or concurrent Ray tasks; 0 = every CPU "
        "(of this machine, or of the Ray cluster); default 1 (serial)",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="'local' processes (default) or 'ray' tasks (needs flowverify[ray])",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster address ('auto', 'ray://host:port', 'host:port'); default: start "
        "a local Ray instance on loopback",
    )
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip the images already recorded in --out (default on; the file must have been "
        "written with the same config)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="discard an existing --out and start afresh"
    )
    return parser


def runner_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`run_jobs` keywords set by :func:`add_runner_args` options."""
    return {
        "workers": args.workers,
        "backend": args.backend,
        "address": args.address,
        "resume": args.resume,
        "overwrite": args.overwrite,
    }


# --------------------------------------------------------------------------- worker side


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _dumps(record: Mapping) -> str:
    return json.dumps(jsonable(record), allow_nan=False)


def _error_lines(batch: Sequence[int], message: str, config: dict) -> dict[int, str]:
    return {
        i: _dumps({"index": i, "status": Status.ERROR.value, "error": message, "config": config})
        + "\n"
        for i in batch
    }


_Result = tuple[dict[int, str], dict[int, list]]


def _run_batch(work: Callable, batch: list[int], config: dict) -> _Result:
    """Run ``work`` on one batch; return ``({index: JSONL text}, {index: payloads})``.

    Runs in the worker.  Exceptions become ``error`` records (the batch's images), so
    nothing unpicklable travels back; records are serialised here, so a record JSON
    cannot encode is an error of its batch too.  The second dict holds the
    :data:`ATTACH_KEY` payloads of the images that have any (aligned with their records).
    """
    attached: dict[int, list] = {}
    try:
        records = work(list(batch))
        if not isinstance(records, (list, tuple)):
            raise TypeError(f"work must return a list of dicts, got {type(records).__name__}")
        per_image: dict[int, list[str]] = {i: [] for i in batch}
        for rec in records:
            if not isinstance(rec, Mapping):
                raise TypeError(f"work must return a list of dicts, got a {type(rec).__name__}")
            idx = rec.get("index")
            if isinstance(idx, bool) or not hasattr(idx, "__index__"):
                raise ValueError(f"work returned a record without an int 'index': {idx!r}")
            idx = int(idx.__index__())
            if idx not in per_image:
                raise ValueError(f"work returned a record for index {idx}, not in its batch")
            rec = dict(rec)
            payload = rec.pop(ATTACH_KEY, None)
            rec["index"] = idx
            rec["config"] = config
            per_image[idx].append(_dumps(rec) + "\n")
            attached.setdefault(idx, []).append(payload)
    except Exception as exc:  # noqa: BLE001 - reported as error records, the run goes on
        raise_if_interrupted(exc)
        return _error_lines(batch, _error_text(exc), config), {}
    out = {}
    for i, lines in per_image.items():
        if lines:
            out[i] = "".join(lines)
        else:
            out[i] = _error_lines([i], "work returned no record for this image", config)[i]
    payloads = {i: p for i, p in attached.items() if any(x is not None for x in p)}
    return out, payloads


def _process_stamp(pid: int) -> str | None:
    """``pid``'s start time (Linux ``/proc``), ``"dead"`` for a zombie, None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "dead"
    except (OSError, IndexError):
        return None
    return "dead" if fields[0] in ("Z", "X") else fields[19]


def _main_alive(main: int, stamp: str | None) -> bool:
    if stamp is not None:  # Linux: a zombie or a recycled pid counts as dead
        return _process_stamp(main) == stamp
    try:
        os.kill(main, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _watch_main(main: int, stamp: str | None) -> None:  # pragma: no cover - runs in workers
    """Exit when the main process dies (even by SIGKILL): no orphan keeps computing."""
    while True:
        time.sleep(0.5)
        if not _main_alive(main, stamp):
            os._exit(1)


def _init_worker(main: int) -> None:  # pragma: no cover - runs in workers
    """Local worker set-up: one thread per library, SIGINT left to the main process."""
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    with contextlib.suppress(Exception):
        import numba

        numba.set_num_threads(1)
    stamp = _process_stamp(main)
    if stamp == "dead":
        os._exit(1)
    threading.Thread(target=_watch_main, args=(main, stamp), daemon=True).start()


# --------------------------------------------------------------------------- signals


class _Signals:
    """SIGINT/SIGTERM -> KeyboardInterrupt, deferred during critical sections."""

    def __init__(self) -> None:
        self._critical = 0
        self._pending: int | None = None
        self._saved: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self._critical:
            self._pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread
        for sig in _SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._saved.clear()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._pending is not None:
                sig, self._pending = self._pending, None
                raise KeyboardInterrupt(signal.Signals(sig).name)


# --------------------------------------------------------------------------- the file


def _read_existing(path: Path) -> tuple[list[tuple[int, str]], bool]:
    """Complete records of ``path`` grouped per image: ``[(index, text)]`` in the order of
    each image's first record (an image's records in file order).

    Returns the groups and whether a trailing partial line was dropped.  Raises a
    ValueError naming ``--out`` for an unreadable line that is not the last one.
    """
    data = path.read_bytes()
    partial = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")
    if partial:
        logger.warning("%s: dropping a trailing partial line (an interrupted write)", path)
    lines = lines[:-1]  # the empty tail after the last newline, or the partial line
    groups: list[tuple[int, str]] = []
    where: dict[int, int] = {}  # index -> position in groups
    scattered = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            rec = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(
                f"--out: line {n} of {str(path)!r} is not a JSON record ({exc}); repair the "
                "file, or pass --overwrite to start afresh"
            ) from None
        idx = rec.get("index") if isinstance(rec, dict) else None
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(
                f"--out: line {n} of {str(path)!r} is not a flowverify record (no integer "
                "'index'); choose another --out, or pass --overwrite to replace the file"
            )
        if idx in where:  # gathered (consecutive or not): never dropped
            k = where[idx]
            scattered += k != len(groups) - 1
            groups[k] = (idx, groups[k][1] + text + "\n")
        else:
            where[idx] = len(groups)
            groups.append((idx, text + "\n"))
    if scattered:
        logger.info("%s: records of some images were not consecutive; gathered per image", path)
    return groups, partial


def _check_config(path: Path, groups: list[tuple[int, str]], config: dict) -> None:
    diffs: dict[str, tuple[Any, Any]] = {}
    kinds: set[str] = set()
    for _, text in groups:
        for line in text.splitlines():
            rec = json.loads(line)
            if "config" not in rec:
                raise ValueError(
                    f"--out: {str(path)!r} holds records without a 'config' (index "
                    f"{rec['index']}); it was not written by this command, so it cannot be "
                    "resumed: choose another --out, or pass --overwrite"
                )
            stored = rec["config"] if isinstance(rec["config"], dict) else {}
            kinds.add(_run_kind(stored))
            for k in config_differences(stored, config):
                diffs.setdefault(k, (stored.get(k, _MISSING), config.get(k, _MISSING)))
    if not diffs:
        return
    now = _run_kind(config)
    other = sorted(kinds - {now, "other"})
    if now != "other" and other:
        raise ValueError(
            f"--out: {str(path)!r} holds {' and '.join(other)} records, not {now} ones; "
            f"write this {now} run to another --out (or pass --overwrite to replace the file)"
        )
    keys = sorted(diffs)
    shown = "; ".join(
        f"{k}: file {_short(diffs[k][0])} vs now {_short(diffs[k][1])}" for k in keys[:3]
    )
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    raise ValueError(
        f"--out: {str(path)!r} was written with a different config (differing keys: "
        f"{', '.join(keys[:3])}{more}; {shown}); refusing to append. Re-run with the same "
        "options, choose another --out, or pass --overwrite to start afresh"
    )


def _run_kind(config: dict) -> str:
    """``attack``, ``certify`` or ``other``: which command wrote a record's config."""
    if "attack" in config:
        return "attack"
    if "method" in config:
        return "certify"
    return "other"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, chunks: Sequence[str]) -> None:
    """Replace ``path`` with ``chunks`` atomically (temporary file, fsync, os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(chunks)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Appender:
    """Appends one image's records with one ``write`` call; :meth:`sync` fsyncs."""

    def __init__(self, path: Path, *, truncate: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o666)

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        while data:  # a regular file takes it in one call; loop only on a short write
            n = os.write(self.fd, data)
            data = data[n:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse a second concurrent run on the same output (advisory lock, POSIX)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(
                f"--out: {str(path)!r} is being written by another running process; wait for "
                "it to finish or choose another --out"
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- backends


class _Lost(Exception):
    """The process running a batch died; ``shared``: other in-flight batches died too."""

    def __init__(self, reason: str, *, shared: bool):
        super().__init__(reason)
        self.shared = shared


def _unusable(exc: BaseException, where: str) -> TypeError:
    """The error for a batch that failed outside ``work`` (it could not be loaded)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
    return TypeError(
        f"work: {where} could not load or run it ({type(exc).__name__}: {detail[:300]}); it must "
        "be importable where it runs: best a function of an installed module (or a "
        "functools.partial of one); functions of a script or notebook work only when all they "
        "use pickles"
    )


class _Serial:
    name = "serial"
    concurrency = 1

    def __init__(self, work: Callable, config: dict):
        self.work, self.config = work, config
        self._results: dict[int, _Result] = {}
        self._next = 0

    def submit(self, batch: list[int]) -> int:
        self._next += 1
        self._results[self._next] = _run_batch(self.work, batch, self.config)
        return self._next

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle: int) -> _Result:
        return self._results.pop(handle)

    def finished(self, handle: int) -> _Result | None:  # pragma: no cover
        return self._results.pop(handle, None)

    def restart(self) -> None:  # pragma: no cover - nothing to restart
        pass

    def abort(self, handles: list) -> None:
        pass

    def close(self) -> None:
        pass


class _LocalPool:
    name = "local"

    def __init__(self, work: Callable, config: dict, workers: int):
        try:
            pickle.dumps(work)
        except Exception as exc:  # noqa: BLE001 - many types for unpicklable objects
            raise TypeError(
                "work: must be picklable to run in worker processes (a module-level function, "
                f"or a functools.partial of one with picklable arguments): {exc}"
            ) from None
        self.work, self.config, self.concurrency = work, config, workers
        if "forkserver" in multiprocessing.get_all_start_methods():
            # Workers fork from a server that has imported flowverify (and the module of
            # `work`) once, instead of importing torch afresh in every worker.
            self._ctx = multiprocessing.get_context("forkserver")
            preload = ["__main__", __name__]
            module = getattr(getattr(work, "func", work), "__module__", None)
            if module and module != "__main__" and module in sys.modules:
                preload.append(module)
            self._ctx.set_forkserver_preload(preload)
        else:  # pragma: no cover - Windows, macOS without forkserver
            self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.concurrency,
            mp_context=self._ctx,
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def submit(self, batch: list[int]) -> cf.Future:
        try:
            return self._pool.submit(_run_batch, self.work, batch, self.config)
        except cf.process.BrokenProcessPool as exc:  # broke before its failure was seen
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            return failed

    def wait(self, handles: list) -> list:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle: cf.Future) -> _Result:
        try:
            return handle.result()
        except cf.process.BrokenProcessPool as exc:
            raise _Lost(f"a worker process died ({exc})", shared=True) from None
        except Exception as exc:  # noqa: BLE001 - work's own errors never get here
            raise _unusable(exc, "worker processes") from None

    def finished(self, handle: cf.Future) -> _Result | None:
        """The result of a batch that completed before the pool broke, else None."""
        if handle.done() and not handle.cancelled() and handle.exception() is None:
            return handle.result()
        return None

    def restart(self) -> None:
        self._terminate()
        self._pool = self._new_pool()

    def _terminate(self) -> None:
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(5)

    def abort(self, handles: list) -> None:
        self._terminate()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _RayTasks:
    name = "ray"

    def __init__(
        self,
        work: Callable,
        config: dict,
        workers: int,
        address: str | None,
        options: Mapping | None,
    ):
        try:
            import ray
        except ImportError:
            raise ValueError(
                "backend: 'ray' needs the optional package ray: pip install 'flowverify[ray]'"
            ) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "ignore_reinit_error": True,
            }
            if address:
                kwargs["address"] = address
            else:  # a new local instance on loopback, never an existing cluster
                kwargs.update(
                    address="local",
                    num_cpus=workers or os.cpu_count() or 1,
                    _node_ip_address="127.0.0.1",
                )
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ValueError(f"address: could not start or reach Ray ({exc})") from None
            self.started = True
        elif address:
            logger.warning("Ray is already initialised in this process; --address ignored")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.concurrency = workers or max(cpus, 1)
        opts = {"num_cpus": 1, "max_retries": 1, **dict(options or {})}
        if opts.get("num_gpus") and not ray.cluster_resources().get("GPU"):
            self.close()
            raise ValueError(
                f"ray_options: tasks ask for num_gpus={opts['num_gpus']}, but the Ray cluster "
                "has no GPU"
            )
        self._task = ray.remote(_run_batch).options(**opts)
        self._work = ray.put(work)
        self.config = config

    def submit(self, batch: list[int]):
        return self._task.remote(self._work, batch, self.config)

    def wait(self, handles: list) -> list:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle) -> _Result:
        exc_mod = self.ray.exceptions
        lost = tuple(
            getattr(exc_mod, n)
            for n in (
                "WorkerCrashedError",
                "NodeDiedError",
                "OutOfMemoryError",
                "ObjectLostError",
                "LocalRayletDiedError",
            )
            if hasattr(exc_mod, n)
        )
        try:
            return self.ray.get(handle)
        except lost as exc:
            raise _Lost(f"a Ray worker died ({type(exc).__name__})", shared=False) from None
        except exc_mod.RayError as exc:  # the task could not even start
            cause = getattr(exc, "cause", None) or exc
            raise _unusable(cause, "Ray workers") from None

    def finished(self, handle) -> _Result | None:  # pragma: no cover
        return None

    def restart(self) -> None:  # pragma: no cover - Ray tasks fail independently
        pass

    def abort(self, handles: list) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(h, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


# --------------------------------------------------------------------------- run_jobs


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
        The JSONL output (``--out``).
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
        raise ValueError(f"--out: cannot create the folder of {str(path)!r} ({exc})") from None

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


def _check_out(out: Any) -> Path:
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike)) or not str(out):
        raise TypeError(f"out: expected a file path, got {out!r}")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out: {str(path)!r} is a folder; expected a .jsonl file path")
    return path


def _kept_groups(
    path: Path, cfg: dict, *, resume: bool, overwrite: bool, repair: bool
) -> list[tuple[int, str]]:
    """The per-image groups of ``path`` a run keeps (none with ``overwrite``), checked.

    With ``repair``, a trailing partial line is removed from the file.
    """
    if overwrite or not path.exists():
        return []
    if not resume:
        raise ValueError(
            f"--out: {str(path)!r} exists; pass --resume to continue it or --overwrite "
            "to start afresh"
        )
    groups, partial = _read_existing(path)
    _check_config(path, groups, cfg)
    if partial and repair:
        _atomic_write(path, [t for _, t in groups])
    return groups


def existing_records(
    out: str | os.PathLike, config: Mapping, *, resume: bool = True, overwrite: bool = False
) -> list[dict]:
    """The records :func:`run_jobs` would keep from ``out``, checked as it checks them.

    Runs nothing and changes nothing: a caller can check, before any work, that what it
    keeps alongside the JSONL (e.g. an ``.npz`` of images) covers the recorded images.

    Parameters
    ----------
    out : str or path-like
        The JSONL output (``--out``).
    config : mapping
        The run's config (see :func:`run_jobs`).
    resume, overwrite : bool, optional
        As for :func:`run_jobs`.

    Returns
    -------
    list of dict
        The complete records of ``out`` (grouped per image, in the order of each image's
        first record); empty if ``out`` does not exist or with ``overwrite``.

    Raises
    ------
    ValueError
        As :func:`run_jobs`: ``out`` exists without ``resume``/``overwrite``, was written
        with a different config, or has a corrupt line.
    """
    path = _check_out(out)
    cfg = _normalise_config(config)
    groups = _kept_groups(path, cfg, resume=resume, overwrite=overwrite, repair=False)
    return [json.loads(line) for _, text in groups for line in text.splitlines()]


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
