"""The vocabulary every stage shares: the result statuses and JSONL records
(:mod:`.results`), validation of arguments at the library's boundary (:mod:`.validation`),
interrupt handling (:mod:`.interrupt`) and giving a long search's freed memory back
(:mod:`.memory`).  Imports nothing else from flowverify.
"""

from flowverify.core.results import JsonlWriter, Status, jsonable, read_jsonl

__all__ = ["JsonlWriter", "Status", "jsonable", "read_jsonl"]
