"""Keep big in-memory copies out of reach of Python's garbage collector.

A full collection walks every container the process holds: with a scope of
100k messages loaded (its records, vector ids, BM25 postings) that is 40-90 ms
during which no request runs, a few times a minute under traffic. These
copies hold no reference cycles to collect, so once one is loaded the objects
alive at that moment are moved to the permanent generation (`gc.freeze()`,
what pre-fork servers do after start-up); what is created later is collected
as usual.
"""

from __future__ import annotations

import gc

FREEZE_MIN_RECORDS = 10_000  # smaller copies cost a collection next to nothing


def loaded(records: int) -> None:
    """A copy of `records` messages has just been loaded."""
    if records >= FREEZE_MIN_RECORDS:
        gc.freeze()
