"""Tables and plots from JSONL results (:mod:`.writer`)."""

from flowverify.report.writer import (
    DEFAULT_RADII,
    ResultGroup,
    attack_radii,
    certified_accuracy,
    load_results,
    not_fooled_fraction,
    sandwich,
    summarize,
    write_report,
)

__all__ = [
    "DEFAULT_RADII",
    "ResultGroup",
    "attack_radii",
    "certified_accuracy",
    "load_results",
    "not_fooled_fraction",
    "sandwich",
    "summarize",
    "write_report",
]
