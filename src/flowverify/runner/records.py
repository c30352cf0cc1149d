"""The records a run keeps from an existing JSONL output, checked before it resumes it.

A resumed run reads back the complete records of its output, grouped per image (records
of one image that are not consecutive in the file are gathered, never dropped; a trailing
partial line, left by a hard kill, is dropped).  Their ``config`` must equal the run's
``config`` up to :data:`NEUTRAL_CONFIG_KEYS` (options that do not change results);
otherwise the run is refused with a ValueError naming ``out`` and the differing keys
(:func:`config_differences`).  :func:`existing_records` returns the records a run would
keep, with the same checks, without running anything.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowverify.core.results import jsonable
from flowverify.runner.output import _atomic_write

__all__ = ["NEUTRAL_CONFIG_KEYS", "config_differences", "existing_records"]

logger = logging.getLogger(__name__)

#: Config keys that do not change results: ignored when a run resumes a file written with
#: another value (how the work is spread, where it is written, how it is shown, and which
#: images are asked for, or how many: records depend on their own image only).
NEUTRAL_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "workers",
        "backend",
        "address",
        "resume",
        "overwrite",
        "out",
        "progress",
        "verbose",
        "quiet",
        "indices",
        "n_images",
    }
)

_MISSING = "<missing>"


def _normalise_config(config: Mapping) -> dict[str, Any]:
    """``config`` as it reads back from JSON (tuples -> lists, numpy -> Python, ...)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a mapping (dict), got {type(config).__name__}")
    try:
        return json.loads(json.dumps(jsonable(dict(config)), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: expected JSON-serialisable values ({exc})") from None


def config_differences(
    recorded: Mapping, current: Mapping, *, ignore: frozenset[str] = NEUTRAL_CONFIG_KEYS
) -> list[str]:
    """Keys whose values differ between two configs, ignoring ``ignore``.

    Parameters
    ----------
    recorded, current : mapping
        Configs as read from a file and as given now (both JSON-normalised first).
    ignore : frozenset of str
        Keys that do not change results, default :data:`NEUTRAL_CONFIG_KEYS`.

    Returns
    -------
    list of str
        Sorted differing keys (present in one only, or with different values).
    """
    a, b = _normalise_config(recorded), _normalise_config(current)
    keys = (a.keys() | b.keys()) - ignore
    return sorted(k for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if value is not _MISSING else "(absent)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_existing(path: Path) -> tuple[list[tuple[int, str]], bool]:
    """Complete records of ``path`` grouped per image: ``[(index, text)]`` in the order of
    each image's first record (an image's records in file order).

    Returns the groups and whether a trailing partial line was dropped.  Raises a
    ValueError naming ``out`` for an unreadable line that is not the last one.
    """
    data = path.read_bytes()
    partial = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")
    if partial:
        logger.warning("%s: dropping a trailing partial line (an interrupted write)", path)
    lines = lines[:-1]  # the empty tail after the last newline, or the partial line
    groups: list[tuple[int, str]] = []
    where: dict[int, int] = {}  # index -> position in groups
    scattered = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            rec = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(
                f"out: line {n} of {str(path)!r} is not a JSON record ({exc}); repair the "
                "file, or pass overwrite=True to start afresh"
            ) from None
        idx = rec.get("index") if isinstance(rec, dict) else None
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(
                f"out: line {n} of {str(path)!r} is not a flowverify record (no integer "
                "'index'); choose another out, or pass overwrite=True to replace the file"
            )
        if idx in where:  # gathered (consecutive or not): never dropped
            k = where[idx]
            scattered += k != len(groups) - 1
            groups[k] = (idx, groups[k][1] + text + "\n")
        else:
            where[idx] = len(groups)
            groups.append((idx, text + "\n"))
    if scattered:
        logger.info("%s: records of some images were not consecutive; gathered per image", path)
    return groups, partial


def _check_config(path: Path, groups: list[tuple[int, str]], config: dict) -> None:
    diffs: dict[str, tuple[Any, Any]] = {}
    kinds: set[str] = set()
    for _, text in groups:
        for line in text.splitlines():
            rec = json.loads(line)
            if "config" not in rec:
                raise ValueError(
                    f"out: {str(path)!r} holds records without a 'config' (index "
                    f"{rec['index']}); it was not written by this command, so it cannot be "
                    "resumed: choose another out, or pass overwrite=True"
                )
            stored = rec["config"] if isinstance(rec["config"], dict) else {}
            kinds.add(_run_kind(stored))
            for k in config_differences(stored, config):
                diffs.setdefault(k, (stored.get(k, _MISSING), config.get(k, _MISSING)))
    if not diffs:
        return
    now = _run_kind(config)
    other = sorted(kinds - {now, "other"})
    if now != "other" and other:
        raise ValueError(
            f"out: {str(path)!r} holds {' and '.join(other)} records, not {now} ones; "
            f"write this {now} run to another out (or pass overwrite=True to replace the file)"
        )
    keys = sorted(diffs)
    shown = "; ".join(
        f"{k}: file {_short(diffs[k][0])} vs now {_short(diffs[k][1])}" for k in keys[:3]
    )
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    raise ValueError(
        f"out: {str(path)!r} was written with a different config (differing keys: "
        f"{', '.join(keys[:3])}{more}; {shown}); refusing to append. Re-run with the same "
        "options, choose another out, or pass overwrite=True to start afresh"
    )


def _run_kind(config: dict) -> str:
    """``attack``, ``certify`` or ``other``: which command wrote a record's config."""
    if "attack" in config:
        return "attack"
    if "method" in config:
        return "certify"
    return "other"


def _check_out(out: Any) -> Path:
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike)) or not str(out):
        raise TypeError(f"out: expected a file path, got {out!r}")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"out: {str(path)!r} is a folder; expected a .jsonl file path")
    return path


def _kept_groups(
    path: Path, cfg: dict, *, resume: bool, overwrite: bool, repair: bool
) -> list[tuple[int, str]]:
    """The per-image groups of ``path`` a run keeps (none with ``overwrite``), checked.

    With ``repair``, a trailing partial line is removed from the file.
    """
    if overwrite or not path.exists():
        return []
    if not resume:
        raise ValueError(
            f"out: {str(path)!r} exists; pass resume=True to continue it or overwrite=True "
            "to start afresh"
        )
    groups, partial = _read_existing(path)
    _check_config(path, groups, cfg)
    if partial and repair:
        _atomic_write(path, [t for _, t in groups])
    return groups


def existing_records(
    out: str | os.PathLike, config: Mapping, *, resume: bool = True, overwrite: bool = False
) -> list[dict]:
    """The records :func:`~flowverify.runner.run_jobs` would keep from ``out``, checked as
    it checks them.

    Runs nothing and changes nothing: a caller can check, before any work, that what it
    keeps alongside the JSONL (e.g. an ``.npz`` of images) covers the recorded images.

    Parameters
    ----------
    out : str or path-like
        The JSONL output.
    config : mapping
        The run's config (see :func:`~flowverify.runner.run_jobs`).
    resume, overwrite : bool, optional
        As for :func:`~flowverify.runner.run_jobs`.

    Returns
    -------
    list of dict
        The complete records of ``out`` (grouped per image, in the order of each image's
        first record); empty if ``out`` does not exist or with ``overwrite``.

    Raises
    ------
    ValueError
        As :func:`~flowverify.runner.run_jobs`: ``out`` exists without
        ``resume``/``overwrite``, was written with a different config, or has a corrupt line.
    """
    path = _check_out(out)
    cfg = _normalise_config(config)
    groups = _kept_groups(path, cfg, resume=resume, overwrite=overwrite, repair=False)
    return [json.loads(line) for _, text in groups for line in text.splitlines()]
