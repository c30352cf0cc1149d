"""Checking decoded image and label arrays and bringing them to the loaders' convention:
``float32`` images ``(N, C, H, W)`` in data units ``[0, 1]`` (``uint8`` divided by 255,
floating point kept after a range check) and ``int64`` labels ``(N,)``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flowverify.core.validation import channel_last_hint

__all__ = ["checked_labels", "to_nchw"]


def to_nchw(x: np.ndarray, *, source: Path, allow_flat: bool = False) -> np.ndarray:
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


def checked_labels(y: np.ndarray, n: int, *, source: Path) -> np.ndarray:
    """Integer labels ``(n,)``, non-negative, as ``int64``; errors name ``y`` and the file."""
    where = f"y in {str(source)!r}"
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{where}: expected integer labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{where}: expected shape ({n},) to match the images, got {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: expected labels >= 0, got minimum {y.min()}")
    return y.astype(np.int64)
