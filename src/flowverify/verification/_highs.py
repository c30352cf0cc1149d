"""One place that creates HiGHS solvers (``highspy.Highs``), quietly.

HiGHS prints a two-line banner on the process's standard output the first time a solver
is created, before any option can switch its output off.  Library code must not print,
and JSONL may go to stdout, so the first construction runs with file descriptor 1
pointed at ``/dev/null``.

HiGHS measures ``time_limit`` against the solver's *cumulative* run time
(``getRunTime()``, summed over every ``run()`` of the object), so a solver that is re-run
many times needs :func:`set_time_limit` to give each run its own budget.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import highspy

_lock = threading.Lock()
_quiet = False


def new_highs() -> highspy.Highs:
    """A ``highspy.Highs`` with ``output_flag`` off (the banner swallowed once)."""
    global _quiet
    if not _quiet:
        with _lock:
            if not _quiet:
                h = _construct_silently()
                _quiet = True
                h.setOptionValue("output_flag", False)
                return h
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


def set_time_limit(h: highspy.Highs, seconds: float | None) -> None:
    """Let the next ``h.run()`` take at most ``seconds`` (None or inf: no limit).

    The limit is set relative to the run time ``h`` has already accumulated; a plain
    ``time_limit`` of ``seconds`` would stop every run at once after the first
    ``seconds`` of total solving.
    """
    if seconds is None or not math.isfinite(seconds):
        h.setOptionValue("time_limit", highspy.kHighsInf)
        return
    h.setOptionValue("time_limit", float(h.getRunTime()) + max(float(seconds), 1e-3))


def _construct_silently() -> highspy.Highs:
    fd = 1  # HiGHS writes to the C standard output, whatever sys.stdout is
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(fd)
    except OSError:
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                return highspy.Highs()
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)
