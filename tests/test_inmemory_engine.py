"""The engine through its public API on `InMemoryStore`: fast, no Chroma, the real
embedding model. Writing, searching, injecting, deleting; the write lane's order
and batches; the journal a crashed process leaves behind."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from reservoir_middleware import MessageRecord, Scope, hookimpl
from reservoir_middleware.records import Answer
from reservoir_middleware.storage.inmemory import InMemoryStore
from reservoir_middleware.store import EmbeddingMismatch
from tests.blocks import block_of, unblocked
from tests.memory_fixtures import (
    CONVERSATION,
    Batches,
    chat,
    leave_journal,
    memory_engine,
    messages,
)


async def test_add_then_search_by_meaning_and_by_word(tmp_path: Path) -> None:
    store = InMemoryStore()
    engine = memory_engine(tmp_path, store=store)
    written = await engine.add("p", "i", messages())
    assert len(written) == 6 and store.count(Scope("p", "i")) == 6
    hits = await engine.search("p", "i", "What kind of dog do I have?", limit=3)
    assert hits[0].record.text == CONVERSATION[0][1]
    assert hits[0].score > hits[-1].score
    by_word = await engine.search("p", "i", "marathon BERLIN", semantic=False)
    assert [h.record.text for h in by_word][:2] == [CONVERSATION[4][1], CONVERSATION[5][1]]
    assert await engine.search("p", "i", "kangaroo", semantic=False) == []


async def test_writes_are_numbered_linked_and_deduplicated(tmp_path: Path) -> None:
    engine = memory_engine(tmp_path)
    await engine.add("p", "i", messages())
    again = await engine.add("p", "i", [*messages(), {"role": "user", "content": "Thanks!"}])
    assert len(again) == 1  # the history re-sent writes nothing new
    stored = await engine.recent("p", "i", limit=100)
    assert [r.seq for r in stored] == list(range(7))
    assert [r.text for r in stored] == [t for _, t in CONVERSATION] + ["Thanks!"]
    assert all(b.before_id == a.id for a, b in itertools.pairwise(stored))
    assert all(r.embedding_model == engine.embedding_model for r in stored)
    sure = [{"role": "user", "content": "Sure."}]
    first = await engine.add("p", "i", sure)
    assert len(first) == 1
    assert await engine.add("p", "i", sure) == []  # sent again at once: a retry
    asked = await engine.add("p", "i", [{"role": "assistant", "content": "Anything else?"}])
    again = await engine.add("p", "i", sure)  # said again later: a new turn
    assert len(again) == 1 and again != first
    last = (await engine.recent("p", "i", limit=1))[0]
    assert (last.id, last.prev_id, last.seq) == (again[0], asked[0], 9)


async def test_enrich_injects_semantic_hits_with_their_answers_and_the_recent_window(
    tmp_path: Path,
) -> None:
    engine = memory_engine(tmp_path, recent_context_size=2)
    await engine.add("p", "i", messages())
    result = await engine.enrich("p", "i", chat("Which race am I preparing for?"), store=False)
    recent = [m.text for m in result.recent.messages]
    assert recent == [CONVERSATION[4][1], CONVERSATION[5][1]]
    semantic = [m.text for m in result.semantic.messages]
    assert not set(semantic) & set(recent)  # each message is injected once
    assert result.changed and unblocked(result.body["messages"][-1]) == {
        "role": "user",
        "content": "Which race am I preparing for?",
    }
    injected = block_of(result.body["messages"][-1])
    assert "Berlin marathon" in injected
    dog = await engine.enrich("p", "i", chat("What is my dog called?"), store=False)
    first, answer = dog.semantic.messages[:2]
    assert (first.text, answer.text) == (CONVERSATION[0][1], CONVERSATION[1][1])
    assert first.similarity is not None and first.similarity > 0.3
    assert len(await engine.recent("p", "i", limit=100)) == 6  # store=False wrote nothing


async def test_enrich_stores_the_request_and_settle_waits_for_it(tmp_path: Path) -> None:
    engine = memory_engine(tmp_path, write_delay_ms=60_000)  # written only when asked
    result = await engine.enrich("p", "i", chat("Remember: my locker code is 4711."))
    assert result.records[0].text == "Remember: my locker code is 4711."
    assert engine.store.recent(Scope("p", "i"), 10) == []  # queued, not written
    await engine.settle(Scope("p", "i"))
    stored = await engine.recent("p", "i")
    assert [r.text for r in stored] == ["Remember: my locker code is 4711."]
    hits = await engine.search("p", "i", "locker code", semantic=False)
    assert [h.record.id for h in hits] == [stored[0].id]


async def test_an_answer_is_stored_after_its_request_in_one_batch(tmp_path: Path) -> None:
    batches = Batches()
    engine = memory_engine(tmp_path, batches)
    result = await engine.enrich("p", "i", chat("Name a prime."), store="with_answer")
    later = await engine.enrich("p", "i", chat("And another?"), store=False)
    assert [m.text for m in later.recent.messages] == ["Name a prime."]  # shown while in flight
    stored = engine.record_answer(result, Answer(content="7", finish_reason="stop"))
    await asyncio.wait_for(stored, 10)
    assert batches.texts == [["Name a prime.", "7"]]
    question, answer = await engine.recent("p", "i")
    assert (answer.role, answer.prev_id, answer.before_id) == (
        "assistant",
        question.id,
        question.id,
    )
    assert question.after_id == answer.id and answer.finish_reason == "stop"


async def test_the_write_lane_keeps_request_order_and_batches_a_scope(tmp_path: Path) -> None:
    batches = Batches()
    engine = memory_engine(tmp_path, batches, write_delay_ms=60_000)
    texts = [f"note number {n}: {word}" for n, word in enumerate("abcdefghij")]
    for text in texts:
        await engine.enrich("p", "i", chat(text))
        await engine.enrich("p", "other", chat(text))
    await engine.settle()
    stored = await engine.recent("p", "i", limit=100)
    assert [r.text for r in stored] == texts  # in the order the requests came
    assert [r.seq for r in stored] == list(range(len(texts)))
    for batch in batches.batches:  # a batch holds one scope, in order
        assert len({r.scope for r in batch}) == 1
        assert [r.seq for r in batch] == sorted(r.seq for r in batch)
    assert len(batches.batches) < 2 * len(texts)  # exchanges went together
    assert sum(len(b) for b in batches.batches) == 2 * len(texts)


class Flaky(InMemoryStore):
    """Down (as with a full disk) for its first `down` writes."""

    def __init__(self, down: int) -> None:
        super().__init__()
        self.down = down
        self.refused = 0

    @hookimpl
    def reservoir_store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: list[list[list[float]]] | None = None,
    ) -> None:
        if self.refused < self.down:
            self.refused += 1
            raise OSError(28, "No space left on device")
        super().reservoir_store(scope, records, embeddings, passages)


async def test_writes_the_store_refuses_wait_and_land_in_order(tmp_path: Path) -> None:
    store = Flaky(down=3)
    engine = memory_engine(tmp_path, store=store, write_delay_ms=0)
    for text in ("first note", "second note", "third note"):
        await engine.enrich("p", "i", chat(text))
    for _ in range(40):  # each settle retries at once; it returns while the store fails
        await engine.settle(timeout=5)
        if store.count(Scope("p", "i")) == 3:
            break
    assert store.refused == 3
    stored = await engine.recent("p", "i")
    assert [(r.seq, r.text) for r in stored] == [
        (0, "first note"),
        (1, "second note"),
        (2, "third note"),
    ]
    assert engine.dead_letters.count() == 0  # the store's fault: nothing set aside


async def test_delete_forgets_a_scope_or_a_whole_partition(tmp_path: Path) -> None:
    store = InMemoryStore()
    engine = memory_engine(tmp_path, store=store)
    await engine.add("p", "i", messages())
    await engine.add("p", "j", [{"role": "user", "content": "Comet is my greyhound."}])
    await engine.add("q", "i", [{"role": "user", "content": "Comet is my greyhound."}])
    assert await engine.delete("p", "i") == 1
    assert await engine.recent("p", "i") == [] and await engine.search("p", "i", "dog") == []
    result = await engine.enrich("p", "i", chat("my dog?"), store=False)
    assert not result.semantic.messages and not result.recent.messages
    assert await engine.delete("p") == 1
    assert store.scopes() == [Scope("q", "i")]
    begun = await engine.enrich("q", "i", chat("this began before the delete"), store="with_answer")
    await engine.delete("q", "i")
    engine.record_answer(begun, Answer(content="so it is never stored"))
    await engine.settle()
    assert store.scopes() == []


async def test_a_store_for_another_model_is_a_clear_error(tmp_path: Path) -> None:
    engine = memory_engine(tmp_path, store=InMemoryStore(embedding_model="some-other-model"))
    with pytest.raises(EmbeddingMismatch, match=r"InMemoryStore\(embedding_model="):
        await engine.add("p", "i", [{"role": "user", "content": "hello"}])
    fine = memory_engine(
        tmp_path / "2", store=InMemoryStore(embedding_model=engine.embedding_model)
    )
    assert len(await fine.add("p", "i", [{"role": "user", "content": "hello"}])) == 1


def _entry(entry: str, text: str, answer: str, began: float) -> dict[str, object]:
    """A journal line as `Reservoir.record_answer` writes it."""
    question = MessageRecord(
        id=f"q-{entry}", partition="p", instance="i", role="user", text=text, trace_id=entry
    )
    reply = MessageRecord(
        id="", partition="p", instance="i", role="assistant", text=answer, trace_id=entry
    )
    return {
        "entry": entry,
        "scope": ["p", "i"],
        "began": began,
        "trace_id": entry,
        "records": [question.to_dict()],
        "answer": reply.to_dict(),
    }


async def test_a_journal_left_by_a_crash_is_replayed_into_the_store(tmp_path: Path) -> None:
    began = time.time()
    path = leave_journal(
        tmp_path / "memory",
        [
            _entry("e1", "My bike is a red Gazelle.", "Nice bike!", began),
            _entry("e2", "It has a basket.", "Handy.", began),
            {"done": "e2"},  # stored before the crash
        ],
        tail='{"entry": "e3", "scope": ["p",',  # torn by the crash
    )
    engine = memory_engine(tmp_path)
    await engine.warm_up()  # replays what dead processes left
    await engine.settle()
    stored = await engine.recent("p", "i")
    assert [(r.role, r.text) for r in stored] == [
        ("user", "My bike is a red Gazelle."),
        ("assistant", "Nice bike!"),
    ]
    assert stored[1].prev_id == stored[0].id
    assert not path.exists()  # every entry stored: the file goes
    again = memory_engine(tmp_path)  # a later process finds nothing left to replay
    await again.warm_up()
    await again.settle()
    assert await again.recent("p", "i") == []
