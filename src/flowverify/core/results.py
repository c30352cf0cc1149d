"""Result records and JSONL output shared by every operation.

Each operation's records share one vocabulary: a ``kind`` (``"certify"``, ``"attack"``,
``"smoothing"``), a :class:`Status`, the ``index`` and ``label`` of the image, radii or
distances in both units (``normalised``: image mass 1; ``raw``: data units, with ``mass``
the image's largest channel mass everywhere), the method, timings and an optional witness;
a failed image is a record of its kind with status ``error`` and the message under
``error``.  ``CertifyResult.to_dict()``, ``SmoothingResult.to_dict()`` and
``AttackResult.to_records()`` give the JSON objects; :class:`JsonlWriter` writes one
object per line, flushed as soon as it is known, never a half-written line.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["JsonlWriter", "Status", "jsonable", "read_jsonl"]


class Status(str, enum.Enum):
    """Outcome of one verification query.

    ``certified``: proven robust at the reported radius.  ``falsified``: an adversarial
    example (witness) was found within the asked radius.  ``unknown``: neither (e.g. an
    incomplete certifier, or a solver that ran out of time; the radius is a proven lower
    bound).  ``misclassified``: the clean image is already misclassified (radius 0).
    ``error``: the computation failed for this image (message in the record).
    """

    CERTIFIED = "certified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    MISCLASSIFIED = "misclassified"
    ERROR = "error"

    def __str__(self) -> str:  # "certified", not "Status.CERTIFIED"
        return self.value


def jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars, arrays, enums and non-finite floats for JSON.

    ``inf``/``nan`` become the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has
    no such numbers); arrays become lists.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class JsonlWriter:
    """Append JSON records to a file, one per line, each flushed and fsync'ed.

    Each record is written with a single ``write`` call of a complete line, so an
    interruption never leaves a half-written line that a reader would take for a record.

    A path that cannot be created or opened (empty, a directory, below a regular file,
    not writable) raises ValueError whose message starts with ``name`` (the argument or
    option that gave the path, e.g. ``--out``) and quotes the path.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "w", name: str = "path"):
        if mode not in ("w", "a"):
            raise ValueError(f"mode: expected 'w' or 'a', got {mode!r}")
        self.path = os.fspath(path)
        if not self.path:
            raise ValueError(f"{name}: expected a file path, got an empty string")
        if os.path.isdir(self.path):
            raise ValueError(f"{name}: expected a file path, got the directory {self.path}")
        try:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._fh = open(self.path, mode, encoding="utf-8")  # noqa: SIM115
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValueError(
                f"{name}: cannot create {self.path}: {_blocking_file(self.path)} is a file, "
                "not a directory"
            ) from exc
        except OSError as exc:
            raise ValueError(
                f"{name}: cannot write {self.path}: {exc.strerror or type(exc).__name__}"
            ) from exc

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(jsonable(record), allow_nan=False) + "\n"
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocking_file(path: str) -> str:
    """The nearest existing ancestor of ``path`` (a file that blocks its directories)."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the complete records of a JSONL file (a trailing partial line is ignored)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
