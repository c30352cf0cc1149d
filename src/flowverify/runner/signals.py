"""SIGINT/SIGTERM in the main process of a run: ``KeyboardInterrupt``, deferred while
records are written.

:class:`_Signals` installs handlers (from the main thread only) that raise
``KeyboardInterrupt`` naming the signal; inside :meth:`_Signals.critical` a signal is held
back and raised when the outermost critical section ends, so a batch's records and
attachments are written whole or not at all.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__: list[str] = []

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))


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
