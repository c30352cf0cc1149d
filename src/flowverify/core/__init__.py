"""The vocabulary every stage shares: the result statuses and JSONL records
(:mod:`.results`), validation of arguments at the library's boundary (:mod:`.validation`)
and interrupt handling (:mod:`.interrupt`).  Imports nothing else from flowverify.
"""

from flowverify.core.results import JsonlWriter, Status, jsonable, read_jsonl

__all__ = ["JsonlWriter", "Status", "jsonable", "read_jsonl"]
