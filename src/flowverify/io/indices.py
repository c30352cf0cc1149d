"""Index specifications: turning ``None``, an int, a slice, a string like ``"0:100"`` or
``"1,5,9"``, or a list of ints into checked positions ``[0, n)``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["parse_indices"]


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
