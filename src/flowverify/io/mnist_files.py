"""MNIST in its distribution format: IDX files (optionally gzip-compressed) with the
labels file found next to the images by its standard name, and torchvision ``MNIST``
folders (``<root>/MNIST/raw``, ``<root>/raw`` or the folder itself)."""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from flowverify.io.image_arrays import checked_labels, to_nchw

__all__ = ["SPLIT_PREFIX", "load_idx_images", "load_mnist_folder", "read_idx"]

logger = logging.getLogger(__name__)

#: File name prefix of each MNIST split.
SPLIT_PREFIX = {"test": "t10k", "train": "train"}
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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


def load_idx_images(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images from an IDX images file, with the labels next to it (else ``None``)."""
    if "labels-idx1" in p.name:
        raise ValueError(
            f"path: {str(p)!r} is an IDX labels file; pass the images file "
            "(*-images-idx3-ubyte) instead"
        )
    x = to_nchw(read_idx(p), source=p)
    y = None
    for cand in _labels_name_for(p.name):
        lp = p.with_name(cand)
        if lp.exists():
            y = checked_labels(read_idx(lp), x.shape[0], source=lp)
            break
    else:
        logger.info("no labels file found next to %s; labels are None", p)
    return x, y


def load_mnist_folder(root: Path, *, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and labels of one split (``"test"`` or ``"train"``) from an MNIST folder."""
    prefix = SPLIT_PREFIX[split]
    candidates = [root / "MNIST" / "raw", root / "raw", root]
    tried = []
    for folder in candidates:
        for suffix in ("", ".gz"):
            img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            tried.append(str(img))
            if img.exists():
                x, y = load_idx_images(img)
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
