"""Tables and plots from JSONL results.

Reading and grouping the records (:mod:`.records`), their statistics (:mod:`.summary`),
markdown and JSON output (:mod:`.tables`), figures (:mod:`.plots`) and the entry point
:func:`write_report` (:mod:`.writer`).
"""

from flowverify.report.records import ResultGroup, load_results
from flowverify.report.summary import (
    DEFAULT_RADII,
    attack_radii,
    certified_accuracy,
    not_fooled_fraction,
    sandwich,
    summarize,
)
from flowverify.report.writer import write_report

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
