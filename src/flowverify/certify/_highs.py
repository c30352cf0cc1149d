"""One place that creates HiGHS solvers (``highspy.Highs``), quietly.

HiGHS prints a two-line banner on the process's standard output the first time a solver
is created, before any option can switch its output off.  Library code must not print,
and JSONL may go to stdout, so the first construction runs with file descriptor 1
pointed at ``/dev/null``.
"""

from __future__ import annotations

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
