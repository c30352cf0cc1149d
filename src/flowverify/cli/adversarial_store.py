"""``--save-adversarial FILE.npz`` of ``flowverify attack``: the adversarial images of a
run's records, one row per record of ``--out``, in the same order.

The npz is rebuilt atomically at the end of every run, also an interrupted one: each
batch's images are first saved to ``FILE.npz.parts/<index>.npy`` before its records are
written (so a killed run loses none), and that folder is removed once the npz holds them
all.  A resumed run takes the images of earlier records from the parts or from the
existing npz; if some are in neither, it is refused before any work (``--overwrite``
recomputes everything).  Error records give rows of NaN pixels.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from flowverify.cli.common import save_array, summary_float

__all__ = ["AdversarialStore", "check_npz_path"]

logger = logging.getLogger(__name__)


class AdversarialStore:
    """``--save-adversarial FILE.npz``: one row per record of ``--out``, in its order.

    :meth:`save` (the runner's ``on_attachment``) writes the rows of an image to
    ``FILE.npz.parts/<index>.npy`` before its records are written; :meth:`assemble`
    rebuilds the npz from the records, taking each row from the parts or, for records of
    earlier runs, from the existing npz (matched by index, position among the image's
    rows, and budget), then removes the parts once the npz holds them all.
    """

    def __init__(self, path: str, images: np.ndarray):
        self.path = Path(path)
        self.parts = Path(f"{path}.parts")
        self.shape = tuple(images.shape[1:])
        self.dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float64
        self._previous: dict | None = None

    # -- writing parts (main process, signals deferred by the runner)

    def save(self, index: int, payloads: list) -> None:
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            rows = [self._blank() if p is None else np.asarray(p) for p in payloads]
            save_array(str(self.parts / f"{index}.npy"), np.stack(rows))
        except OSError as exc:
            raise ValueError(
                f"--save-adversarial: cannot write {str(self.parts)!r} ({exc})"
            ) from None

    def clear_parts(self) -> None:
        if self.parts.is_dir():
            shutil.rmtree(self.parts, ignore_errors=True)

    def _blank(self) -> np.ndarray:
        return np.full(self.shape, np.nan, dtype=self.dtype)

    # -- reading back

    def _part(self, index: int) -> np.ndarray | None:
        path = self.parts / f"{index}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("--save-adversarial: ignoring the unreadable %s (%s)", path, exc)
            return None

    def _earlier(self) -> dict[tuple[int, int], tuple[float, np.ndarray]]:
        """``(index, k) -> (eps, image)`` of the rows of the existing npz."""
        if self._previous is not None:
            return self._previous
        out: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as d:
                    adv, index, eps = d["adversarial"], d["index"], d["eps"]
                seen: collections.Counter = collections.Counter()
                for r, i in enumerate(index.tolist()):
                    out[(int(i), seen[i])] = (float(eps[r]), adv[r])
                    seen[i] += 1
            except (OSError, ValueError, KeyError, IndexError) as exc:
                logger.warning(
                    "--save-adversarial: ignoring the unreadable %s (%s)", self.path, exc
                )
                out = {}
        self._previous = out
        return out

    def _rows(self, records: list[dict]) -> tuple[list[np.ndarray], list[int]]:
        """The image of every record (NaN for error records) and the indices lacking one."""
        rows, missing = [], []
        seen: collections.Counter = collections.Counter()
        parts: dict[int, np.ndarray | None] = {}
        for rec in records:
            i = int(rec["index"])
            k = seen[i]
            seen[i] += 1
            if rec.get("status") == "error":
                rows.append(self._blank())
                continue
            if i not in parts:
                parts[i] = self._part(i)
            part = parts[i]
            if part is not None and k < len(part) and part.shape[1:] == self.shape:
                rows.append(part[k])
                continue
            eps = summary_float(rec.get("eps"))
            prev = self._earlier().get((i, k))
            if prev is not None and prev[1].shape == self.shape and _same(prev[0], eps):
                rows.append(prev[1])
                continue
            rows.append(self._blank())
            missing.append(i)
        return rows, missing

    def check(self, records: list[dict]) -> None:
        """Refuse (ValueError naming the flag) to resume records whose images are lost."""
        _, missing = self._rows(records)
        if missing:
            shown = ", ".join(map(str, sorted(set(missing))[:10]))
            raise ValueError(
                f"--save-adversarial: {str(self.path)!r} lacks the adversarial images of "
                f"{len(missing)} record(s) already in --out (indices {shown}); pass --overwrite "
                "to recompute them, or choose another --out"
            )

    def assemble(self, records: list[dict]) -> None:
        """Write the npz (atomically) from ``records``; drop the parts once it has them."""
        rows, missing = self._rows(records)
        adversarial = (
            np.stack(rows).astype(self.dtype, copy=False)
            if rows
            else np.zeros((0, *self.shape), dtype=self.dtype)
        )
        arrays = {
            "adversarial": adversarial,
            "index": np.array([int(r["index"]) for r in records], dtype=np.int64),
            "eps": np.array([summary_float(r.get("eps")) for r in records], dtype=np.float64),
            "success": np.array([r.get("success") is True for r in records], dtype=bool),
            "w1": np.array([summary_float(r.get("w1")) for r in records], dtype=np.float64),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._previous = None
        if missing:
            logger.warning(
                "--save-adversarial: %d row(s) without an image (NaN) in %s; kept %s",
                len(missing),
                self.path,
                self.parts,
            )
        else:
            self.clear_parts()


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def check_npz_path(path) -> str:
    """Check a ``--save-adversarial`` path (a file that can be created); returns it."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str) or not text:
        raise ValueError(f"--save-adversarial: expected a .npz file path, got {path!r}")
    if os.path.isdir(text):
        raise ValueError(f"--save-adversarial: {text!r} is a folder; expected a .npz file path")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--save-adversarial: cannot create {text!r}: {parent!r} is a file")
    return text
