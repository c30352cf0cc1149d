"""Interrupts must stop a run, never become an image's ``error`` record.

The runner turns SIGINT/SIGTERM into ``KeyboardInterrupt`` (:mod:`flowverify.runner`).
Raised while a numba kernel calls back into Python (e.g. while it unpickles a constant),
it reaches the caller wrapped: ``SystemError: ... returned a result with an exception set``
whose ``__cause__`` is the ``KeyboardInterrupt``.  Per-image ``except Exception`` handlers
call :func:`raise_if_interrupted` first, so such a wrapped interrupt stops the run (and a
resume re-runs the image) instead of being recorded as the image's failure.
"""

from __future__ import annotations

__all__ = ["raise_if_interrupted"]


def raise_if_interrupted(exc: BaseException) -> None:
    """Raise ``KeyboardInterrupt`` if one is in ``exc``'s cause/context chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, KeyboardInterrupt):
            raise KeyboardInterrupt(*cur.args) from exc
        cur = cur.__cause__ or cur.__context__
