"""Writing the JSONL output safely: one ``write`` per batch, atomic rewrites, one writer.

:class:`_Appender` appends a batch's records with one ``write`` system call and fsyncs
them, so a batch is on disk whole or (after a hard kill) as a trailing partial line that
a reader drops.  :func:`_atomic_write` replaces the file through a temporary file,
``fsync`` and ``os.replace`` (the final rewrite in input order, or the removal of a
partial line).  :func:`_exclusive` holds an advisory lock next to the output (POSIX only)
so that only one run at a time writes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

try:  # POSIX advisory locks; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__: list[str] = []


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
                f"out: {str(path)!r} is being written by another running process; wait for "
                "it to finish or choose another out"
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)
