"""Backends that run batches on this machine: serially, or on local worker processes.

:class:`_Serial` runs each batch in the calling process, as soon as it is submitted.
:class:`_LocalPool` runs batches on a pool of worker processes (``forkserver`` where
available, else ``spawn``), one thread each, that ignore SIGINT (the main process decides)
and exit by themselves when the main process dies.  A worker that dies (segfault,
out-of-memory killer, ``kill -9``) breaks the pool: its batches raise
:class:`~flowverify.runner.batch._Lost` and :meth:`_LocalPool.restart` starts a fresh one.

Both offer the backend interface :func:`flowverify.runner.run_jobs` drives: ``submit``,
``wait``, ``result``, ``finished``, ``restart``, ``abort`` and ``close``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable

from flowverify.runner.batch import _Lost, _Result, _run_batch, _unusable

__all__: list[str] = []


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
