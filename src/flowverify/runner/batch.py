"""One batch of a work function, as a worker runs it, and the ways a batch can fail.

:func:`_run_batch` is what every backend (serial, local processes, Ray tasks) runs: it
calls ``work`` on a batch of indices and turns the records into JSONL text, each with the
run's ``config``.  An exception escaping ``work`` becomes ``error`` records of the whole
batch, so nothing unpicklable travels back.  Arrays a record carries under
:data:`ATTACH_KEY` are split off and shipped back beside the text.

A batch can also fail outside ``work``: its worker died (:class:`_Lost`), or ``work``
could not be loaded where it runs (:func:`_unusable`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from flowverify.core.interrupt import raise_if_interrupted
from flowverify.core.results import Status, jsonable

__all__ = ["ATTACH_KEY"]

#: Record key of the arrays a work function hands to ``on_attachment`` (see
#: :func:`flowverify.runner.run_jobs`); never written to the JSONL.
ATTACH_KEY = "__attachment__"

#: What a batch gives back: ``({index: JSONL text}, {index: payloads})``.
_Result = tuple[dict[int, str], dict[int, list]]


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
