"""How much semantic memory a question gets, from how related it is to what
is stored: all of it, a few short messages, or none.

Without a gate the memory budget is filled with the least bad hits even when
nothing stored is related to the question (another user's memory, a new
topic). The decision is per query, on the best dense (cosine) similarity of
the question to the searched scopes (values calibrated on the development
splits of LoCoMo and LongMemEval: bench/calibrate_relevance.py; README,
"Relevance floor"):

- at or above `relevance_full`: every hit the budget holds;
- from `relevance_floor` up: a band where a question's own scope and another
  user's overlap. It gets the best hits with their answers (or questions), but
  only messages of at most `relevance_band_message_tokens` tokens, up to
  `relevance_band_tokens` in all: the evidence of a personal question is
  mostly a short user turn, often the question paired with a hit that is a
  long assistant answer, while what another user's scope offers is mostly
  long answers;
- below `relevance_floor`: none with hybrid retrieval, where the dense
  retriever's low similarity outweighs a lexical match (measured on both
  benchmarks: no own question loses evidence), unless the question names a
  number, a code or a name that exactly one candidate holds (`exact_match`):
  that one, alone; with a single retriever (no second opinion: dense only, or
  BM25 only) its best hit, alone, as a rare word or a fact deep in a long
  message may be all there is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from reservoir_middleware.context import MemoryUnit
from reservoir_middleware.memory._selection import Hit
from reservoir_middleware.memory.keywords import WORD, terms
from reservoir_middleware.records import MessageRecord


@dataclass(frozen=True)
class Relevance:
    """What the gate allows: `cap` None, everything (`alone`: the best hit
    only, without its answer or neighbours); else that many tokens of messages
    no longer than `longest`."""

    cap: int | None = None
    longest: int = 0
    alone: bool = False


ALL = Relevance()


def best_similarity(hits: Sequence[Hit]) -> float | None:
    """The best dense similarity among fused hits (None: no dense candidate)."""
    known = [h.similarity for h in hits if h.similarity is not None]
    return max(known) if known else None


def single_retriever(disabled: Sequence[str]) -> bool:
    """Whether one of the two built-in retrievers is off (no second opinion)."""
    return bool({"semantic", "lexical"} & set(disabled))


def relevance(
    best: float | None,
    floor: float,
    full: float,
    band_tokens: int,
    longest: int,
    *,
    single: bool = False,
) -> Relevance:
    """The gate for a question whose best similarity is `best` (None: unknown,
    all); `single`: the hits come from a single retriever."""
    if best is None or best >= max(floor, full):
        return ALL
    if best >= floor:
        return Relevance(band_tokens, longest)
    return Relevance(alone=True) if single else Relevance(0, 0)


def trimmed(
    units: Sequence[MemoryUnit], gate: Relevance, tokens: Callable[[MessageRecord], int]
) -> list[MemoryUnit]:
    """The units, best first, reduced to what `gate` allows: of each, its
    messages of at most `gate.longest` tokens, while `gate.cap` holds them."""
    if gate.cap is None:
        return list(units)
    out: list[MemoryUnit] = []
    used = 0
    for unit in sorted(units, key=lambda u: u.score, reverse=True):
        kept: list[MessageRecord] = []
        for record in unit.records:
            cost = tokens(record)
            if cost > gate.longest:
                continue
            if used + cost > gate.cap:
                return out + ([_unit(unit, kept)] if kept else [])
            kept.append(record)
            used += cost
        if kept:
            out.append(_unit(unit, kept))
    return out


def _unit(unit: MemoryUnit, records: list[MessageRecord]) -> MemoryUnit:
    """`unit` with only `records`; without its hit, the first of them stands for
    it (truncation injects a unit's other messages only after its hit)."""
    hit = unit.hit_id if any(r.id == unit.hit_id for r in records) else records[0].id
    return replace(unit, records=records, hit_id=hit)


def identifiers(question: str) -> set[str]:
    """The question's words a dense model reads poorly and a person means
    exactly: numbers and codes (a word with a digit) and names (a capitalised
    word, not the question's first), as BM25 keys them."""
    found = set()
    for index, raw in enumerate(WORD.findall(question)):
        if any(ch.isdigit() for ch in raw) or (index > 0 and raw[:1].isupper()):
            found.update(terms(raw))
    return found


def exact_match(question: str, hits: Sequence[Hit]) -> Hit | None:
    """Among resolved hits, the best one holding one of the question's
    identifiers that no other hit holds: "what does 88213407 refer to?" is
    about the one message that says 88213407, however low its similarity."""
    wanted = identifiers(question)
    if not wanted:
        return None
    held = [wanted & set(terms(h.record.text)) for h in hits]
    counts = Counter(t for found in held for t in found)
    for hit, found in zip(hits, held, strict=True):
        if any(counts[t] == 1 for t in found):
            return hit
    return None
