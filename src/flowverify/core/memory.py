"""Giving freed heap memory back to the system during long searches.

A branch-and-bound search allocates and frees large temporary tensors (a batch of
subdomains' bound rows: tens of MB) between the small long-lived objects of its search
tree.  glibc's allocator serves the temporaries from the heap once its dynamic mmap
threshold has risen, and the tree's objects then pin the heap: freed memory is kept by
the process, and the resident size kept growing with the search on a 256x2 network
(1.1 GB after a minute, a tenth of it live).  ``malloc_trim(0)`` returns
the free pages anywhere in the heap (about a millisecond), but the next batch faults
them in again: after a batch, at most every two seconds (a 60 s search on that net
peaked at 0.9 GB instead of 1.1, in as many nodes; every quarter second, 0.8 GB and 6%
fewer nodes).  Elsewhere than glibc nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

__all__ = ["release_free_memory"]

_state: dict = {"trim": None, "last": 0.0}


def _trim():
    if _state["trim"] is None:
        _state["trim"] = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _state["trim"] = libc.malloc_trim
        except (OSError, AttributeError):  # not glibc
            pass
    return _state["trim"]


def release_free_memory(*, every: float = 2.0) -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``), at most once
    per ``every`` seconds.  Returns whether it ran."""
    now = time.monotonic()
    trim = _trim()
    if not trim or now - _state["last"] < every:
        return False
    _state["last"] = now
    trim(0)
    return True
