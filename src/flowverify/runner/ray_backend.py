"""The Ray backend: batches as Ray tasks, on a local Ray instance or a cluster.

:class:`_RayTasks` starts Ray (a new local instance on loopback, or the cluster at
``address``) unless it is already initialised, ships the work function once
(``ray.put``) and runs each batch as a task of
:func:`~flowverify.runner.batch._run_batch`.  A task whose worker or node died raises
:class:`~flowverify.runner.batch._Lost` (tasks fail independently); one that could not
load the work function raises the error of :func:`~flowverify.runner.batch._unusable`.
It offers the backend interface :func:`flowverify.runner.run_jobs` drives, as
:mod:`flowverify.runner.local` does.  Ray is optional: ``pip install 'flowverify[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from flowverify.runner.batch import _Lost, _Result, _run_batch, _unusable

__all__: list[str] = []

logger = logging.getLogger(__name__)


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
            logger.warning("Ray is already initialised in this process; address ignored")
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
