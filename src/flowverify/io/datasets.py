"""Reading images and labels from common formats.

Every loader returns images as a ``float32`` array of shape ``(N, C, H, W)`` in
*data units* ``[0, 1]`` (``uint8`` sources are divided by 255, floating-point
sources are kept as they are) and labels as an ``int64`` array of shape
``(N,)``, or ``None`` when the source carries no labels.

Supported sources (see :func:`load_images`):

* ``.npz`` archives with an ``x`` array and an optional ``y`` array;
* MNIST IDX files (``*-images-idx3-ubyte``, optionally gzip-compressed), with
  the labels file found next to them by the standard name;
* a torchvision ``MNIST`` folder (``<root>/MNIST/raw/``, ``<root>/raw/`` or a
  folder holding the IDX files directly);
* single 8- or 16-bit, non-interlaced PNG images (grey, grey + alpha, RGB,
  RGBA), decoded with :mod:`zlib` and :mod:`struct` only;
* the bundled sample of 500 MNIST digits (``"bundled"`` or ``None``).

No loader ever unpickles data (``allow_pickle`` is always ``False``).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from flowverify.core.validation import channel_last_hint

__all__ = [
    "BUNDLED_DIGITS",
    "bundled_digits",
    "load_images",
    "parse_indices",
    "read_idx",
    "read_png",
]

logger = logging.getLogger(__name__)

#: File name of the bundled sample inside ``flowverify/assets``.
BUNDLED_DIGITS = "digits500.npz"

_BUNDLED_NAMES = ("bundled", "digits500")
_SPLIT_PREFIX = {"test": "t10k", "train": "train"}
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_COLOUR_NAMES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


# --------------------------------------------------------------------------- indices


def parse_indices(spec, n: int) -> np.ndarray:
    """Turn an index specification into an array of positions.

    Parameters
    ----------
    spec : None, int, str, slice or sequence of int
        ``None`` selects everything. A string is either a single index
        (``"3"``), a comma-separated list (``"1,5,9"``) or a Python slice
        without brackets (``"0:100"``, ``"::2"``, ``"-10:"``). Negative
        positions count from the end, as in Python.
    n : int
        Number of available items.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(K,)`` with non-negative positions in
        ``[0, n)``, in the requested order (repetitions are kept).

    Raises
    ------
    TypeError
        If ``spec`` has an unsupported type.
    ValueError
        If ``spec`` cannot be parsed, refers to a position outside
        ``[-n, n)`` (slice bounds outside ``[-n, n]``), has a zero step, or
        selects nothing.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise TypeError(f"n must be a non-negative int, got {n!r}")
    n = int(n)
    if spec is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(spec, str):
        spec = _parse_index_string(spec)
    if isinstance(spec, slice):
        out = _resolve_slice(spec, n)
    elif isinstance(spec, bool):
        raise TypeError(
            f"indices must be an int, a slice, a string or a list of ints, got {spec!r}"
        )
    elif isinstance(spec, int | np.integer):
        _check_python_ints([int(spec)], n)
        out = _check_positions(np.array([int(spec)], dtype=np.int64), n)
    elif isinstance(spec, Sequence | np.ndarray):
        if not isinstance(spec, np.ndarray) and all(
            isinstance(i, int | np.integer) and not isinstance(i, bool) for i in spec
        ):
            _check_python_ints([int(i) for i in spec], n)  # before int64 could overflow
        arr = np.asarray(spec)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(
                "indices must be a flat sequence of ints, got "
                f"{type(spec).__name__} with dtype {arr.dtype} and shape {arr.shape}"
            )
        out = _check_positions(arr, n)
    else:
        raise TypeError(
            "indices must be None, an int, a slice, a string like '0:100' or '1,5,9', "
            f"or a list of ints; got {type(spec).__name__}"
        )
    if out.size == 0:
        raise ValueError(f"indices selects no items (valid range [0, {n}), got {spec!r})")
    return out


def _parse_index_string(text: str):
    s = text.strip()
    if not s:
        raise ValueError("indices must not be an empty string")
    try:
        if ":" in s:
            parts = [p.strip() for p in s.split(":")]
            if len(parts) > 3:
                raise ValueError("too many ':'")
            vals = [int(p) if p else None for p in parts]
            return slice(*vals)
        if "," in s:
            return [int(p) for p in s.split(",") if p.strip()]
        return int(s)
    except ValueError as exc:
        raise ValueError(
            "indices string must look like '7', '1,5,9' or 'start:stop[:step]', "
            f"got {text!r} ({exc})"
        ) from None


def _resolve_slice(sl: slice, n: int) -> np.ndarray:
    for name in ("start", "stop", "step"):
        v = getattr(sl, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
            raise TypeError(f"indices slice {name} must be an int or None, got {v!r}")
    if sl.step == 0:
        raise ValueError("indices slice step must not be zero")
    for name in ("start", "stop"):
        v = getattr(sl, name)
        if v is not None and not -n <= v <= n:
            raise ValueError(
                f"indices slice {name} out of range: valid range is [-{n}, {n}] "
                f"for {n} items, got {v} (in {_fmt_slice(sl)})"
            )
    return np.arange(n, dtype=np.int64)[sl]


def _fmt_slice(sl: slice) -> str:
    parts = ["" if v is None else str(v) for v in (sl.start, sl.stop, sl.step)]
    return ":".join(parts if sl.step is not None else parts[:2])


def _out_of_range(shown: list[int], more: bool, n: int) -> ValueError:
    return ValueError(
        f"indices out of range: valid range is [0, {n}) (or [-{n}, 0) from the end) "
        f"for {n} items, got {shown}{' ...' if more else ''}"
    )


def _check_python_ints(values: list[int], n: int) -> None:
    """Range check on Python ints (arbitrary size), before any conversion to int64."""
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise _out_of_range(bad[:5], len(bad) > 5, n)


def _check_positions(pos: np.ndarray, n: int) -> np.ndarray:
    if pos.dtype.kind == "u":  # unsigned: compare before the cast (2**63 would wrap)
        bad = pos >= n
        if np.any(bad):
            raise _out_of_range(pos[bad][:5].tolist(), int(bad.sum()) > 5, n)
        pos = pos.astype(np.int64)
    elif pos.dtype != np.int64:
        pos = pos.astype(np.int64)
    bad = (pos < -n) | (pos >= n)
    if np.any(bad):
        raise _out_of_range(pos[bad][:5].tolist(), int(bad.sum()) > 5, n)
    return np.where(pos < 0, pos + n, pos)


# --------------------------------------------------------------------------- main API


def load_images(
    path: str | os.PathLike | None = None,
    *,
    indices=None,
    split: str = "test",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load images (and labels, if present) from a file or folder.

    Parameters
    ----------
    path : str, path-like or None
        The source. ``None`` or ``"bundled"`` loads the bundled sample of 500
        MNIST digits (:func:`bundled_digits`). Otherwise, depending on what it
        points to:

        * ``*.npz``: an archive with key ``x`` (``uint8`` or floating point)
          of shape ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, D)`` and an
          optional integer key ``y`` of shape ``(N,)``. Flat ``(N, D)`` data
          is reshaped to ``(N, 1, s, s)`` only when ``D = s * s`` is a perfect
          square (for example 784 -> 28 x 28); otherwise it is refused. Other
          keys are ignored.
        * an IDX file (``*-images-idx3-ubyte`` or ``*.gz``): the labels file is
          looked up next to it by the standard name (``images-idx3`` ->
          ``labels-idx1``, with or without ``.gz``); without it, labels are
          ``None``.
        * a folder: a torchvision ``MNIST`` root (``<root>/MNIST/raw``,
          ``<root>/raw`` or ``<root>`` itself holding the IDX files); see
          ``split``.
        * ``*.png``: a single 8- or 16-bit non-interlaced PNG (grey, grey +
          alpha, RGB or RGBA; the alpha channel is dropped), giving
          ``N = 1`` and no labels.
    indices : None, int, str, slice or sequence of int, optional
        Which images to keep, see :func:`parse_indices` (for example
        ``"0:100"`` or ``"1,5,9"``). Default: all.
    split : {"test", "train"}, optional
        Which MNIST split to read from a folder (``t10k-*`` or ``train-*``
        files). Ignored for other sources. Default ``"test"``.

    Returns
    -------
    x : numpy.ndarray
        ``float32`` images of shape ``(N, C, H, W)``, data units in ``[0, 1]``.
    y : numpy.ndarray or None
        ``int64`` labels of shape ``(N,)``, or ``None`` when the source has
        none.

    Raises
    ------
    FileNotFoundError
        If ``path`` (or the IDX files inside a folder) does not exist.
    ValueError
        If the file cannot be read (corrupted or truncated), has the wrong
        keys or shapes, contains negative, non-finite or > 1 floating-point
        pixels, labels that are negative or do not match the number of
        images, or if ``indices`` is out of range.
    TypeError
        If an argument or an array has an unsupported type.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    if path is None or (isinstance(path, str) and path in _BUNDLED_NAMES):
        x, y = bundled_digits()
    else:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str, a path-like or None, got {type(path).__name__}")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"path: no such file or folder: {str(p)!r}")
        x, y = _load_path(p, split=split)
    if indices is not None:
        sel = parse_indices(indices, x.shape[0])
        x = x[sel]
        y = None if y is None else y[sel]
    return x, y


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled sample of 500 MNIST digits.

    The sample is the first 500 digits of the held-out part (the last 2,000)
    of ``mnist10k.npz``; the bundled models were not trained on it. The file
    also stores ``source_index``, the positions of the digits in
    ``mnist10k.npz``.

    Returns
    -------
    x : numpy.ndarray
        ``float32`` images of shape ``(500, 1, 28, 28)`` in ``[0, 1]``.
    y : numpy.ndarray
        ``int64`` labels of shape ``(500,)``.
    """
    ref = resources.files("flowverify").joinpath("assets", BUNDLED_DIGITS)
    with resources.as_file(ref) as p:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"bundled digits not found at {str(p)!r}; reinstall flowverify "
                "or run scripts/train_models.py"
            )
        x, y = _load_npz(Path(p))
    if y is None:
        raise ValueError(f"bundled digits at {str(p)!r} have no labels 'y'")
    return x, y


# --------------------------------------------------------------------------- dispatch


def _load_path(p: Path, *, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    if p.is_dir():
        return _load_mnist_folder(p, split=split)
    name = p.name.lower()
    if name.endswith(".npz"):
        return _load_npz(p)
    if name.endswith(".png"):
        return _to_nchw(read_png(p), source=p), None
    if "idx" in name and "ubyte" in name:
        return _load_idx_images(p)
    # Sniff the content for files without a telling name.
    head = _read_head(p, 8)
    if head.startswith(_PNG_SIGNATURE):
        return _to_nchw(read_png(p), source=p), None
    if head.startswith(b"PK"):
        return _load_npz(p)
    raise ValueError(
        f"path: unrecognised file type for {str(p)!r}; expected a .npz archive, an MNIST IDX "
        "file (*-images-idx3-ubyte[.gz]), a .png image, an MNIST folder or 'bundled'"
    )


def _read_head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc


# --------------------------------------------------------------------------- npz


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


def _load_npz(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
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
    x = _to_nchw(x, source=p, allow_flat=True)
    if y is not None:
        y = _check_labels(y, x.shape[0], source=p)
    return x, y


# --------------------------------------------------------------------------- validation


def _to_nchw(x: np.ndarray, *, source: Path, allow_flat: bool = False) -> np.ndarray:
    """Validate pixel values and bring images to float32 ``(N, C, H, W)``."""
    where = f"x in {str(source)!r}"
    if x.dtype == np.uint8:
        out = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        out = x.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{where}: expected finite pixel values, got NaN or inf")
        if out.size and out.min() < 0:
            raise ValueError(f"{where}: expected pixel values >= 0, got minimum {out.min():g}")
        if out.size and out.max() > 1:
            raise ValueError(
                f"{where}: expected floating-point pixel values in [0, 1], got maximum "
                f"{out.max():g} (store 0-255 data as uint8, or divide by 255)"
            )
    else:
        raise TypeError(f"{where}: expected dtype uint8 or floating point, got {x.dtype}")
    if out.ndim == 4:
        pass
    elif out.ndim == 3:
        out = out[:, None]
    elif out.ndim == 2 and allow_flat:
        n, d = out.shape
        s = math.isqrt(d)
        if s * s != d:
            raise ValueError(
                f"{where}: flat images of shape (N, D) need D to be a perfect square "
                f"(e.g. 784 = 28 x 28), got shape {out.shape}; store them as (N, H, W)"
            )
        out = out.reshape(n, 1, s, s)
    else:
        expected = "(N, H, W), (N, C, H, W) or (N, H*W) with a square H*W"
        if not allow_flat:
            expected = "(N, H, W) or (N, C, H, W)"
        raise ValueError(f"{where}: expected shape {expected}, got {x.shape}")
    if min(out.shape) == 0:
        raise ValueError(f"{where}: expected at least one non-empty image, got shape {x.shape}")
    if out.shape[2] < 2 or out.shape[3] < 2:
        raise ValueError(
            f"{where}: expected images of at least 2x2 pixels as (N, C, H, W), got shape "
            f"{x.shape}" + channel_last_hint(x.shape)
        )
    return np.ascontiguousarray(out)


def _check_labels(y: np.ndarray, n: int, *, source: Path) -> np.ndarray:
    where = f"y in {str(source)!r}"
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{where}: expected integer labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{where}: expected shape ({n},) to match the images, got {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: expected labels >= 0, got minimum {y.min()}")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST distribution format), optionally gzip-compressed.

    Parameters
    ----------
    path : str or path-like
        File to read; ``*.gz`` files are decompressed.

    Returns
    -------
    numpy.ndarray
        The stored array with its stored shape, in native byte order (for
        MNIST images: ``uint8`` of shape ``(N, 28, 28)``; labels: ``(N,)``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a valid IDX file or is truncated.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: no such file: {str(p)!r}")
    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                raw = fh.read()
        else:
            raw = p.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"could not read {str(p)!r}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"could not read {str(p)!r}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise ValueError(
            f"could not read {str(p)!r}: expected {expected} bytes of data for shape {dims}, "
            f"got {got} (truncated or corrupted file)"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _labels_name_for(images_name: str) -> list[str]:
    base = images_name[:-3] if images_name.lower().endswith(".gz") else images_name
    if "images-idx3" not in base:
        return []
    lab = base.replace("images-idx3", "labels-idx1")
    return [lab, lab + ".gz"]


def _load_idx_images(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if "labels-idx1" in p.name:
        raise ValueError(
            f"path: {str(p)!r} is an IDX labels file; pass the images file "
            "(*-images-idx3-ubyte) instead"
        )
    x = _to_nchw(read_idx(p), source=p)
    y = None
    for cand in _labels_name_for(p.name):
        lp = p.with_name(cand)
        if lp.exists():
            y = _check_labels(read_idx(lp), x.shape[0], source=lp)
            break
    else:
        logger.info("no labels file found next to %s; labels are None", p)
    return x, y


def _load_mnist_folder(root: Path, *, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    prefix = _SPLIT_PREFIX[split]
    candidates = [root / "MNIST" / "raw", root / "raw", root]
    tried = []
    for folder in candidates:
        for suffix in ("", ".gz"):
            img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            tried.append(str(img))
            if img.exists():
                x, y = _load_idx_images(img)
                if y is None:
                    raise FileNotFoundError(
                        f"path: found {str(img)!r} but no labels file "
                        f"{prefix}-labels-idx1-ubyte[.gz] next to it"
                    )
                return x, y
    raise FileNotFoundError(
        f"path: {str(root)!r} is a folder but holds no MNIST {split} split; looked for "
        f"{prefix}-images-idx3-ubyte[.gz] in <root>/MNIST/raw, <root>/raw and <root>"
    )


# --------------------------------------------------------------------------- PNG


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG image without third-party dependencies.

    Supports non-interlaced images with bit depth 8 or 16 and colour types
    grey, grey + alpha, RGB and RGBA. Alpha channels are dropped (with a
    logged warning when they are not fully opaque).

    Parameters
    ----------
    path : str or path-like
        The PNG file.

    Returns
    -------
    numpy.ndarray
        ``(1, C, H, W)`` with ``C`` = 1 (grey) or 3 (colour); ``uint8`` for
        8-bit images, ``float32`` in ``[0, 1]`` for 16-bit images.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a PNG, is corrupted or truncated (bad CRC, bad
        compressed data), or uses an unsupported feature (palette,
        interlacing, bit depth other than 8 or 16).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: no such file: {str(p)!r}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"could not read {str(p)!r}: {exc}") from exc
    where = f"could not read {str(p)!r}"
    if not raw.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{where}: not a PNG file (bad signature)")
    pos = len(_PNG_SIGNATURE)
    ihdr = None
    idat = []
    while True:
        if pos + 8 > len(raw):
            raise ValueError(f"{where}: truncated PNG (no IEND chunk)")
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        ctype = raw[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(raw):
            raise ValueError(f"{where}: truncated PNG chunk {ctype!r}")
        body = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length : end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{where}: CRC mismatch in chunk {ctype!r} (corrupted file)")
        pos = end
        if ctype == b"IHDR":
            if length != 13:
                raise ValueError(f"{where}: malformed IHDR chunk")
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None:
        raise ValueError(f"{where}: missing IHDR chunk")
    width, height, depth, colour, comp, filt, interlace = ihdr
    if colour not in _PNG_CHANNELS:
        raise ValueError(
            f"{where}: unsupported colour type {_PNG_COLOUR_NAMES.get(colour, colour)}; "
            "expected grey, grey+alpha, RGB or RGBA"
        )
    if depth not in (8, 16):
        raise ValueError(f"{where}: unsupported bit depth {depth}; expected 8 or 16")
    if interlace != 0:
        raise ValueError(f"{where}: interlaced PNGs are not supported")
    if comp != 0 or filt != 0:
        raise ValueError(f"{where}: unknown compression or filter method")
    if width == 0 or height == 0:
        raise ValueError(f"{where}: empty image ({width} x {height})")
    try:
        data = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ValueError(f"{where}: bad compressed data ({exc})") from exc
    channels = _PNG_CHANNELS[colour]
    bpp = channels * depth // 8
    stride = width * bpp
    if len(data) != height * (stride + 1):
        raise ValueError(
            f"{where}: expected {height * (stride + 1)} bytes of image data, got {len(data)}"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(height, stride + 1)
    img = _png_unfilter(rows, bpp, where=where)
    if depth == 16:
        pix = img.view(">u2").reshape(height, width, channels).astype(np.float32) / 65535.0
        opaque = 1.0
    else:
        pix = img.reshape(height, width, channels)
        opaque = 255
    if channels in (2, 4):
        if np.any(pix[..., -1] != opaque):
            logger.warning("%s has transparent pixels; the alpha channel is dropped", p)
        pix = pix[..., :-1]
    return np.ascontiguousarray(pix.transpose(2, 0, 1)[None])


def _png_unfilter(rows: np.ndarray, bpp: int, *, where: str) -> np.ndarray:
    height, width1 = rows.shape
    stride = width1 - 1
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for r in range(height):
        ftype = int(rows[r, 0])
        line = rows[r, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):  # sequential dependence on the reconstructed left pixel
                a = cur[i - bpp] if i >= bpp else 0
                b = prev[i]
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = prev[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 0xFF
        else:
            raise ValueError(f"{where}: unknown PNG filter type {ftype} in row {r}")
        out[r] = cur
        prev = cur
    return out
