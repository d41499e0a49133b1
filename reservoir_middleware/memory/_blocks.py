"""Memory blocks kept with the user message they were retrieved for.

A provider bills a prompt prefix it has seen at a fraction of the price and
skips its prefill. A client that re-sends its history sends on turn k+1 what
it sent on turn k, plus the new turns; memory keeps that prefix when every
user message carries, on every later turn, byte for byte, the block it got
when it was the newest: so the block's message ids are stored with the
message's record (`MessageRecord.memory`) and the block is rendered again
from them. The store is the only state: any replica, after any restart,
renders the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from reservoir_middleware.context import memory_block
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import MemoryStore

# The newest user message's block is used again (no retrieval) when its record
# is younger than this: a retry, or a tool step of the same turn. An older one
# (the same first words opening a new conversation) gets a fresh block; prompt
# caches hold a prefix for minutes, an hour at most.
REUSE_SECONDS = 3600.0
# Each later turn's block may take at least this share of the memory budget,
# however much the earlier turns' blocks already take.
FOLLOWUP_SHARE = 0.25

Ref = tuple[str, str]  # (instance, message id)


def encode(
    semantic: Sequence[MessageRecord], recent: Sequence[MessageRecord], instance: str
) -> str | None:
    """A block as stored with its message: the ids of each section, in order
    (with the instance for another instance's message)."""
    if not semantic and not recent:
        return None

    def refs(records: Sequence[MessageRecord]) -> list[Any]:
        return [r.id if r.instance == instance else [r.instance, r.id] for r in records]

    return json.dumps({"s": refs(semantic), "r": refs(recent)}, separators=(",", ":"))


def decode(text: str | None, instance: str) -> tuple[list[Ref], list[Ref]]:
    """The refs of a stored block; a value that is not one reads as no block."""
    if not text:
        return [], []
    try:
        data = json.loads(text)
    except ValueError:
        return [], []
    if not isinstance(data, dict):
        return [], []

    def refs(items: Any) -> list[Ref]:
        out: list[Ref] = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, str):
                out.append((instance, item))
            elif (
                isinstance(item, list)
                and len(item) == 2
                and all(isinstance(part, str) for part in item)
            ):
                out.append((item[0], item[1]))
        return out

    return refs(data.get("s")), refs(data.get("r"))


def without_ids(text: str | None, ids: set[str]) -> str | None:
    """A stored block without these messages (forgotten, expired): not even
    their ids stay on disk. None: nothing left to show."""
    if not text or not any(i in text for i in ids):
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None

    def kept(items: Any) -> list[Any]:
        return [
            item
            for item in (items if isinstance(items, list) else [])
            if (item[-1] if isinstance(item, list) and item else item) not in ids
        ]

    semantic, recent = kept(data.get("s")), kept(data.get("r"))
    if not semantic and not recent:
        return None
    return json.dumps({"s": semantic, "r": recent}, separators=(",", ":"))


@dataclass
class Carried:
    """The blocks a request's user messages carry from earlier turns."""

    texts: dict[int, str] = field(default_factory=dict)  # record index -> block text
    shown: set[str] = field(default_factory=set)  # ids of the messages they show
    reused: bool = False  # the newest user message's own block is among them


async def carried_blocks(
    store: MemoryStore,
    in_flight: Callable[[Scope], tuple[MessageRecord, ...]],
    scope: Scope,
    records: Sequence[MessageRecord],
    anchor: int | None,
    *,
    others: bool = False,
) -> Carried:
    """Read what each user record of the request was stored with, and render
    its block again. `anchor` is the index of the newest user record: its
    block counts only when recent (`REUSE_SECONDS`). Another instance's
    messages are shown only when `others` (`semantic_scope="partition"`)."""
    users = [i for i, r in enumerate(records) if r.role == "user"]
    if not users:
        return Carried()
    known = {r.id: r for r in in_flight(scope) if r.memory}
    wanted = [records[i].id for i in users if records[i].id not in known]
    if wanted:
        stored = await anyio.to_thread.run_sync(store.get, scope, wanted)
        known.update((r.id, r) for r in stored if r.memory)
    blocks: dict[int, tuple[list[Ref], list[Ref]]] = {}
    now = time.time()
    for i in users:
        copy = known.get(records[i].id)
        if copy is None:
            continue
        if i == anchor and now - copy.timestamp > REUSE_SECONDS:
            continue
        semantic, recent = decode(copy.memory, scope.instance)
        if not others:
            semantic = [ref for ref in semantic if ref[0] == scope.instance]
            recent = [ref for ref in recent if ref[0] == scope.instance]
        blocks[i] = (semantic, recent)
    if not blocks:
        return Carried()
    found = await _read(store, scope, in_flight, blocks.values())
    carried = Carried(reused=anchor in blocks)
    for i, (semantic, recent) in blocks.items():
        shown_semantic = [found[ref] for ref in semantic if ref in found]
        shown_recent = [found[ref] for ref in recent if ref in found]
        text = memory_block(shown_semantic, shown_recent, scope.instance)
        if text:
            carried.texts[i] = text
            carried.shown.update(r.id for r in (*shown_semantic, *shown_recent))
    return carried


async def _read(
    store: MemoryStore,
    scope: Scope,
    in_flight: Callable[[Scope], tuple[MessageRecord, ...]],
    blocks: Any,
) -> dict[Ref, MessageRecord]:
    """The messages blocks show, one store read per scope; a message since
    forgotten or deleted is left out (its block shows the rest)."""
    wanted: dict[str, set[str]] = {}
    for semantic, recent in blocks:
        for instance, id_ in (*semantic, *recent):
            wanted.setdefault(instance, set()).add(id_)
    found: dict[Ref, MessageRecord] = {}
    pending = {r.id: r for r in in_flight(scope)}
    for instance, ids in wanted.items():
        if instance == scope.instance:
            for id_ in [i for i in ids if i in pending]:
                found[(instance, id_)] = pending[id_]
                ids.discard(id_)
        if ids:
            records = await anyio.to_thread.run_sync(
                store.get, Scope(scope.partition, instance), sorted(ids)
            )
            found.update(((instance, r.id), r) for r in records)
    return found
