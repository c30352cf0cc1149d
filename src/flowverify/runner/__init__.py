"""Many images, several workers: resumable, parallel runs that append one JSONL
record per image.

:func:`run_jobs` (:mod:`.jobs`) drives a run; :mod:`.records` reads and checks the records
of an existing output; :mod:`.output` writes it safely; :mod:`.batch` is what a worker
runs; :mod:`.local` and :mod:`.ray_backend` run batches on this machine or on Ray;
:mod:`.signals` defers SIGINT/SIGTERM while records are written.
"""

from flowverify.runner.batch import ATTACH_KEY
from flowverify.runner.jobs import BACKENDS, WorkerCrashedError, run_jobs
from flowverify.runner.records import NEUTRAL_CONFIG_KEYS, config_differences, existing_records

__all__ = [
    "ATTACH_KEY",
    "BACKENDS",
    "NEUTRAL_CONFIG_KEYS",
    "WorkerCrashedError",
    "config_differences",
    "existing_records",
    "run_jobs",
]
