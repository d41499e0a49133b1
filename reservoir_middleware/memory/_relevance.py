"""Whether a question is about anything stored: all its semantic memory, or
its single best hit.

Without a gate the memory budget is filled with the least bad hits even when
nothing stored is related to the question (another user's memory, a new
topic). The decision is per query: the best dense (cosine) similarity of the
question to the searched scopes, compared with `relevance_floor`, a value
calibrated on the development splits of LoCoMo and LongMemEval
(bench/calibrate_relevance.py; README, "Relevance floor"). Below it only the
best fused hit is kept, alone (without its answer or neighbours): a rare word
that only BM25 matches, or a fact deep in a long message, still comes through,
at the cost of one message instead of the whole budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from reservoir_middleware.memory._selection import Hit


def best_similarity(hits: Sequence[Hit]) -> float | None:
    """The best dense similarity among fused hits (None: no dense candidate)."""
    known = [h.similarity for h in hits if h.similarity is not None]
    return max(known) if known else None


def relevant(hits: list[Hit], best: float | None, floor: float) -> tuple[list[Hit], bool]:
    """The hits to keep, and whether the question is related to the scope: all
    of them when its best similarity reaches `floor` (or is unknown), else only
    the first (best fused) one."""
    if best is None or best >= floor:
        return hits, True
    return hits[:1], False
