"""The runner's command-line options: flags in, :func:`~flowverify.runner.run_jobs`
keywords out, and runner errors reworded to name the flags.

:data:`RUNNER_OPTIONS` declares the execution options shared by ``flowverify certify`` and
``flowverify attack`` (:mod:`flowverify.cli.options`; none is recorded in the config:
they change how the work is run, not its results).  :func:`add_runner_args` adds them to
a parser; :func:`runner_kwargs` turns the parsed namespace into ``run_jobs`` keywords and
:func:`config_from_args` into a plain dict of every parsed option.

The runner names its Python keywords in its errors (``workers: ...``,
``pass overwrite=True``); :func:`runner_errors_as_flags` rewords such errors to name the
flags instead (``--workers: ...``, ``pass --overwrite``), for the one-line CLI message.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from flowverify.cli.options import Group, Option, OptionSchema
from flowverify.runner import BACKENDS

__all__ = [
    "RUNNER_FLAGS",
    "RUNNER_OPTIONS",
    "add_runner_args",
    "config_from_args",
    "flag_runner_error",
    "runner_errors_as_flags",
    "runner_kwargs",
]

#: The execution options shared by ``certify`` and ``attack``: ``run_jobs`` keywords.
EXECUTION = Group("execution")
RUNNER_OPTIONS = OptionSchema(
    Option(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="parallel workers: local processes, or concurrent Ray tasks; 0 = every CPU "
        "(of this machine, or of the Ray cluster); default 1 (serial)",
        group=EXECUTION,
        keyword="workers",
        record=False,
    ),
    Option(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="'local' processes (default) or 'ray' tasks (needs flowverify[ray])",
        group=EXECUTION,
        keyword="backend",
        record=False,
    ),
    Option(
        "--address",
        help="Ray cluster address ('auto', 'ray://host:port', 'host:port'); default: start "
        "a local Ray instance on loopback",
        group=EXECUTION,
        keyword="address",
        record=False,
    ),
    Option(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip the images already recorded in --out (default on; the file must have been "
        "written with the same config)",
        group=EXECUTION,
        keyword="resume",
        record=False,
    ),
    Option(
        "--overwrite",
        action="store_true",
        help="discard an existing --out and start afresh",
        group=EXECUTION,
        keyword="overwrite",
        record=False,
    ),
)

#: ``run_jobs`` keyword -> the flag that sets it (``ray_options`` follow ``--device``).
RUNNER_FLAGS: dict[str, str] = {
    **RUNNER_OPTIONS.flags(),
    "out": "--out",
    "ray_options": "--device",
}

#: Keyword phrases of the runner's advice, and what they say on the command line.
_PHRASES = (
    ("overwrite=True", "--overwrite"),
    ("resume=True", "--resume"),
    ("another out", "another --out"),
)


def add_runner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the execution options shared by ``certify`` and ``attack``.

    ``--workers N`` (default 1; 0 = every CPU), ``--backend local|ray``, ``--address``
    (Ray), ``--resume/--no-resume`` (default on) and ``--overwrite``.  Pass the parsed
    namespace through :func:`runner_kwargs` to :func:`~flowverify.runner.run_jobs`.
    """
    return RUNNER_OPTIONS.add_arguments(parser)


def runner_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`~flowverify.runner.run_jobs` keywords set by :func:`add_runner_args`."""
    return RUNNER_OPTIONS.keywords(args)


def config_from_args(args: argparse.Namespace, *, drop: Sequence[str] = ("func",)) -> dict:
    """Every parsed option as a plain dict: ``vars(args)`` without callables and ``drop``
    (the config the subcommands record comes from their option schemas instead)."""
    return {k: v for k, v in vars(args).items() if k not in drop and not callable(v)}


def flag_runner_error(exc: BaseException) -> BaseException:
    """``exc`` reworded to name flags if the runner raised it naming a keyword, else ``exc``.

    A message led by a keyword of :data:`RUNNER_FLAGS` (``out: ...``) is led by its flag
    instead, and its advice names flags (``pass --overwrite``, ``choose another --out``).
    The exception type is kept.
    """
    msg = (str(exc.args[0]) if len(exc.args) == 1 else str(exc)).strip()
    head, sep, rest = msg.partition(":")
    flag = RUNNER_FLAGS.get(head.strip()) if sep else None
    if flag is None:
        return exc
    for keyword, shown in _PHRASES:
        rest = rest.replace(keyword, shown)
    try:
        return type(exc)(f"{flag}:{rest}")
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return ValueError(f"{flag}:{rest}")


@contextlib.contextmanager
def runner_errors_as_flags() -> Iterator[None]:
    """Re-raise the runner's ValueError/TypeError naming keywords as ones naming flags."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        flagged = flag_runner_error(exc)
        if flagged is exc:
            raise
        raise flagged from None
