"""From the retrieval plugins' candidates to the memory sections of a request.

Semantic candidates of several plugins are fused by reciprocal rank; messages
already in the request (and, without a memory budget, in the recent window)
are removed; the best hits bring their answer (or question) and their synapse
neighbours, the consecutive messages they were linked to at storage time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reservoir_middleware.context import Candidate, MemoryUnit
from reservoir_middleware.records import MessageRecord, Scope

RRF_K = 60


@dataclass
class Hit:
    record: MessageRecord
    score: float
    similarity: float | None
    resolved: bool = True  # False: `record` is a reference (id and scope) to read


def fuse(outcome: Sequence[tuple[str, list[Candidate]]]) -> list[Hit]:
    """Semantic candidates of every plugin, best first, one per message.

    With one contributing plugin its own order stands; with several, each
    message scores the sum of 1/(60 + rank) over the plugins that ranked it.
    """
    ranked: list[list[Candidate]] = []
    for _, candidates in outcome:
        ordered = sorted(
            (c for c in candidates if c.section == "semantic"), key=lambda c: c.score, reverse=True
        )
        if ordered:
            ranked.append(ordered)
    best: dict[str, Hit] = {}
    for ordered in ranked:
        seen: set[str] = set()
        for rank, cand in enumerate(ordered):
            if cand.record.id in seen:
                continue
            seen.add(cand.record.id)
            gain = cand.score if len(ranked) == 1 else 1.0 / (RRF_K + rank + 1)
            sim = cand.score if cand.source == "semantic" else None
            hit = best.get(cand.record.id)
            if hit is None:
                best[cand.record.id] = Hit(cand.record, gain, sim, cand.resolved)
            else:
                hit.score += gain
                hit.similarity = hit.similarity if sim is None else sim
                if cand.resolved and not hit.resolved:
                    hit.record, hit.resolved = cand.record, True
    return sorted(best.values(), key=lambda h: h.score, reverse=True)


def recent_window(
    outcome: Sequence[tuple[str, list[Candidate]]],
    limit: int,
    excluded: Callable[[MessageRecord], bool],
) -> list[MessageRecord]:
    """The last `limit` messages proposed for the recent section, oldest first."""
    records: dict[str, MessageRecord] = {}
    for _, candidates in outcome:
        for cand in candidates:
            if cand.section == "recent":
                records.setdefault(cand.record.id, cand.record)
    # messages still being written have no seq yet; they are the newest
    ordered = sorted(records.values(), key=lambda r: (r.seq < 0, r.seq, r.timestamp))
    window = ordered[-limit:] if limit else []
    return [r for r in window if not excluded(r)]


def neighbour_ids(hits: Sequence[Hit]) -> dict[Scope, list[str]]:
    """The messages just before and after each hit: its answer or question, its synapses."""
    wanted: dict[Scope, list[str]] = {}
    for hit in hits:
        ids = [i for i in (hit.record.before_id, hit.record.after_id) if i]
        wanted.setdefault(hit.record.scope, []).extend(ids)
    return wanted


def build_units(
    hits: Sequence[Hit],
    neighbours: dict[str, MessageRecord],
    *,
    pair_answers: bool,
    synapse_limit: int,
    excluded: Callable[[MessageRecord], bool],
    paired: int | None = None,
) -> list[MemoryUnit]:
    """One unit per hit: the hit, its pair and its linked neighbours, in order.

    Only the best `paired` hits (None: all) bring their pair and neighbours;
    a later hit that is one of those joins that unit. The others come alone.
    """
    used: set[str] = set()
    units: list[MemoryUnit] = []
    for rank, hit in enumerate(hits):
        record = hit.record
        if record.id in used:
            continue
        members = {record.id: record}
        before = neighbours.get(record.before_id or "")
        after = neighbours.get(record.after_id or "")
        if paired is not None and rank >= paired:
            before = after = None
        if pair_answers:
            if record.role == "user" and after is not None and after.role == "assistant":
                members[after.id] = after
            if record.role == "assistant" and before is not None and before.role == "user":
                members[before.id] = before
        linked = 0
        if before is not None and record.synapse_prev == before.id and linked < synapse_limit:
            members[before.id] = before
            linked += 1
        if after is not None and after.synapse_prev == record.id and linked < synapse_limit:
            members[after.id] = after
            linked += 1
        kept = [
            m
            for m in members.values()
            if m.id not in used and (m.id == record.id or not excluded(m))
        ]
        used.update(m.id for m in kept)
        kept.sort(key=lambda m: (m.seq, m.timestamp))
        units.append(MemoryUnit(kept, hit.score, record.id, hit.similarity))
    return units
