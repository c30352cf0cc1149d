"""Reading images and labels from a file, a folder or the bundled sample.

Every source gives images as a ``float32`` array of shape ``(N, C, H, W)`` in
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

import os
from pathlib import Path

import numpy as np

from flowverify.io.bundled import BUNDLED_NAMES, bundled_digits
from flowverify.io.image_arrays import to_nchw
from flowverify.io.indices import parse_indices
from flowverify.io.mnist_files import SPLIT_PREFIX, load_idx_images, load_mnist_folder
from flowverify.io.npz import load_npz
from flowverify.io.png import PNG_SIGNATURE, read_png

__all__ = ["load_images"]


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
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(SPLIT_PREFIX)}, got {split!r}")
    if path is None or (isinstance(path, str) and path in BUNDLED_NAMES):
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


def _load_path(p: Path, *, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    if p.is_dir():
        return load_mnist_folder(p, split=split)
    name = p.name.lower()
    if name.endswith(".npz"):
        return load_npz(p)
    if name.endswith(".png"):
        return to_nchw(read_png(p), source=p), None
    if "idx" in name and "ubyte" in name:
        return load_idx_images(p)
    # Sniff the content for files without a telling name.
    head = _read_head(p, 8)
    if head.startswith(PNG_SIGNATURE):
        return to_nchw(read_png(p), source=p), None
    if head.startswith(b"PK"):
        return load_npz(p)
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
