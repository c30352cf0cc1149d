"""Many images, several workers: resumable, parallel runs that append one JSONL
record per image (:mod:`.jobs`).
"""

from flowverify.runner.jobs import (
    ATTACH_KEY,
    BACKENDS,
    NEUTRAL_CONFIG_KEYS,
    WorkerCrashedError,
    add_runner_args,
    config_differences,
    config_from_args,
    existing_records,
    run_jobs,
    runner_kwargs,
)

__all__ = [
    "ATTACH_KEY",
    "BACKENDS",
    "NEUTRAL_CONFIG_KEYS",
    "WorkerCrashedError",
    "add_runner_args",
    "config_differences",
    "config_from_args",
    "existing_records",
    "run_jobs",
    "runner_kwargs",
]
