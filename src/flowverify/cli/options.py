"""Declarative command-line options: one description per option, from which a subcommand
gets its argparse flags, the keywords it passes to the library and the config it records.

An :class:`Option` is one flag: its argparse settings (type, default, help, choices, ...),
the Python keyword it maps to (of :func:`flowverify.certify`, :func:`flowverify.attack`
or :func:`flowverify.runner.run_jobs`; ``None`` for options of the command line only) and
whether its value goes into the config recorded with every JSONL record (the "resolved
config" that a resumed run must match).  A :class:`Derived` field is recorded but set by
no flag (its value is computed by the run, e.g. the package version).  An
:class:`OptionSchema` is the ordered list of a subcommand's fields; that order is the
order of the flags (in ``--help`` and usage messages) and of the recorded config's keys
(after the library's own record of its resolved keywords, where the library keeps one).

The options that ``certify`` and ``attack`` share are declared once, in
:mod:`flowverify.cli.shared_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Derived", "Group", "Option", "OptionSchema"]


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Options shown together: an argparse argument group (``title``, a section of
    ``--help``) and/or a mutually exclusive group (``exclusive``; ``required``: exactly
    one of its options must be given).  Options share a group by naming the same object."""

    title: str | None = None
    exclusive: bool = False
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option.

    Parameters
    ----------
    flag : str
        The flag, e.g. ``"--batch-size"``; its argparse ``dest`` (``batch_size``) is also
        its key in the recorded config.
    help : str
        Help text (argparse ``%(default)s`` works).
    type, default, choices, metavar, action, required
        As for :meth:`argparse.ArgumentParser.add_argument` (``None``: not passed).
    group : Group, optional
        The argument group the option is shown in.
    keyword : str, optional
        The Python keyword it sets (see :meth:`OptionSchema.keywords`).
    record : bool
        Whether its value is part of the recorded config (options that change results);
        ``False`` for options that only say where output goes or how the work is run.
    record_value : callable, optional
        How the parsed value is recorded (default: as it is).
    record_when : callable, optional
        ``record_when(args)`` false: not recorded in this run (options of one method).
    """

    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Iterable[Any] | None = None
    metavar: str | None = None
    action: str | type[argparse.Action] | None = None
    required: bool = False
    group: Group | None = None
    keyword: str | None = None
    record: bool = True
    record_value: Callable[[Any], Any] | None = None
    record_when: Callable[[argparse.Namespace], bool] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination, also the key in the recorded config."""
        return self.flag.lstrip("-").replace("-", "_")

    #: The key in the recorded config (the ``dest``).
    key = dest

    def add_to(self, container) -> argparse.Action:
        """Add the flag to an argparse parser or group."""
        settings: dict[str, Any] = {"help": self.help}
        for name in ("type", "default", "choices", "metavar", "action"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        if self.required:
            settings["required"] = True
        return container.add_argument(self.flag, **settings)

    def recorded(self, args: argparse.Namespace) -> bool:
        """Whether the run with options ``args`` records this option."""
        return self.record and (self.record_when is None or bool(self.record_when(args)))

    def value(self, args: argparse.Namespace) -> Any:
        """The parsed value as recorded."""
        value = getattr(args, self.dest)
        return value if self.record_value is None else self.record_value(value)


@dataclasses.dataclass(frozen=True)
class Derived:
    """A field of the recorded config that no flag sets; the run computes its value."""

    key: str
    help: str
    keyword = None  # sets no Python keyword

    def recorded(self, args: argparse.Namespace) -> bool:
        """Always: a derived field is part of every run's config."""
        return True


class OptionSchema:
    """The ordered options (and derived fields) of a subcommand."""

    def __init__(self, *fields: Option | Derived):
        keys = [f.key for f in fields]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate option keys in {keys}")
        self.fields = fields

    @property
    def options(self) -> tuple[Option, ...]:
        """The fields that are flags, in order."""
        return tuple(f for f in self.fields if isinstance(f, Option))

    def add_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add every option's flag to ``parser``, in order, each in its group."""
        containers: dict[int, Any] = {}
        for opt in self.options:
            group = opt.group
            if group is None:
                opt.add_to(parser)
                continue
            if id(group) not in containers:
                box = parser if group.title is None else parser.add_argument_group(group.title)
                if group.exclusive:
                    box = box.add_mutually_exclusive_group(required=group.required)
                containers[id(group)] = box
            opt.add_to(containers[id(group)])
        return parser

    def flags(self) -> dict[str, str]:
        """Python keyword -> the flag that sets it."""
        return {o.keyword: o.flag for o in self.options if o.keyword is not None}

    def keywords(self, args: argparse.Namespace, **values: Any) -> dict[str, Any]:
        """The Python keywords set by the options, from the parsed ``args``; ``values``
        gives, by keyword, those the command resolved itself (a parsed list, a default
        that depends on another option)."""
        unknown = set(values) - set(self.flags())
        if unknown:
            raise KeyError(f"not keywords of this schema: {sorted(unknown)}")
        return {
            o.keyword: values.get(o.keyword, getattr(args, o.dest))
            for o in self.options
            if o.keyword is not None
        }

    def recorded_config(
        self,
        args: argparse.Namespace,
        *,
        resolved: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> dict[str, Any]:
        """The config a run records with its results.

        Every recorded field in schema order, under its key.  ``values`` gives the value of
        each :class:`Derived` field and of options the command resolved itself (e.g. a
        default that depends on another option).  ``resolved``, the library's own record of
        its resolved keywords (such as :meth:`flowverify.attacks.WassersteinPGD.config`),
        leads the config; an option whose keyword it holds is recorded there, as the
        library resolved it.
        """
        keys = {f.key for f in self.fields}
        unknown = set(values) - keys
        if unknown:
            raise KeyError(f"not fields of this schema: {sorted(unknown)}")
        config = dict(resolved or {})
        for f in self.fields:
            if not f.recorded(args) or (resolved is not None and f.keyword in resolved):
                continue
            if f.key in values:
                config[f.key] = values[f.key]
            elif isinstance(f, Derived):
                raise KeyError(f"no value given for the derived field {f.key!r}")
            else:
                config[f.key] = f.value(args)
        return config
