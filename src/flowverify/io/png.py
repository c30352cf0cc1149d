"""Decoding single PNG images (8- or 16-bit, non-interlaced; grey, grey + alpha, RGB or
RGBA) with :mod:`zlib` and :mod:`struct` only."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["PNG_SIGNATURE", "read_png"]

logger = logging.getLogger(__name__)

#: The eight bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_COLOUR_NAMES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


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
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError(f"{where}: not a PNG file (bad signature)")
    pos = len(PNG_SIGNATURE)
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
