"""Reading ``.npz`` archives (an ``x`` array and an optional ``y`` array) without
unpickling, with the zip directory checked so that a corrupted archive is an error
rather than silently missing data."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from flowverify.io.image_arrays import checked_labels, to_nchw

__all__ = ["load_npz"]


# What numpy/zipfile raise for a truncated or corrupted archive: NotImplementedError for a
# corrupted 'version needed' or 'compression method' field, RuntimeError for a corrupted
# 'encrypted' flag.
_NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


def _check_member_headers(p: Path) -> None:
    """Open every member of the archive (headers only, no data is read).

    zipfile checks that each member's local header agrees with the central directory, so
    a corrupted member name there (``y.npy`` read as ``{.npy``, say) is an error instead
    of a silently missing key.  The data's CRC-32 is checked as numpy reads it.
    """
    try:
        with zipfile.ZipFile(p) as z:
            members = z.infolist()
            for info in members:
                z.open(info).close()
        declared = _declared_members(p)
    except _NPZ_ERRORS as exc:
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    if declared is not None and declared != len(members):
        # e.g. a corrupted comment length that swallows the next directory entry
        raise ValueError(
            f"could not read {str(p)!r}: corrupted zip directory (the archive declares "
            f"{declared} members, the directory lists {len(members)})"
        )


def _declared_members(p: Path) -> int | None:
    """The member count in the zip's end-of-central-directory record (None: zip64/none)."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        fh.seek(max(0, size - (22 + 0xFFFF)))  # the record (22 bytes) + a comment
        tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    (total,) = struct.unpack("<H", tail[at + 10 : at + 12])
    return None if total == 0xFFFF else total


def load_npz(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and labels (``None`` without a ``y`` key) from an ``.npz`` archive."""
    try:
        data = np.load(p, allow_pickle=False)
    except _NPZ_ERRORS as exc:
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"could not read {str(p)!r}: expected an .npz archive, got a single .npy array"
        )
    with data:
        _check_member_headers(p)
        keys = list(data.keys())
        if "x" not in keys:
            raise ValueError(
                f"{str(p)!r}: expected key 'x' (and optionally 'y'), found keys {keys}"
            )
        try:
            x = np.asarray(data["x"])
            y = np.asarray(data["y"]) if "y" in keys else None
        except _NPZ_ERRORS as exc:
            raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    x = to_nchw(x, source=p, allow_flat=True)
    if y is not None:
        y = checked_labels(y, x.shape[0], source=p)
    return x, y
