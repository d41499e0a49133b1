"""The `Storage` contract: the same behaviours of `ChromaStore` (real embedded
Chroma, inline) and `InMemoryStore`, so that tests on the in-memory one say
something about Chroma. Writes go through the store's `reservoir_store` hook,
as the engine's do."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reservoir_middleware import MessageRecord, Scope
from reservoir_middleware.memory._passages import PASSAGE_DISCOUNT
from reservoir_middleware.memory.embeddings import MiniLMEmbedding
from reservoir_middleware.records import embedding_text
from reservoir_middleware.storage.chroma import ChromaStore
from reservoir_middleware.storage.inmemory import InMemoryStore
from reservoir_middleware.store import EmbeddingMismatch, Location, MemoryStore, Storage
from tests.memory_fixtures import CONVERSATION, embedder, vectors
from tests.test_passages import LONG_ANSWER, QUESTION

MODEL = MiniLMEmbedding.model_name
SCOPE = Scope("p", "i")
TEXTS = CONVERSATION


def records(scope: Scope = SCOPE, texts: list[tuple[str, str]] = TEXTS) -> list[MessageRecord]:
    """Numbered as the engine numbers them; two messages (one exchange) per trace."""
    return [
        MessageRecord(
            id=f"{scope.instance}-{n}",
            partition=scope.partition,
            instance=scope.instance,
            role=role,
            text=text,
            trace_id=f"t{n // 2}",
            seq=n,
            timestamp=1_700_000_000.0 + n,
            embedding_model=MODEL,
            before_id=f"{scope.instance}-{n - 1}" if n else None,
            tool_calls=[{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]
            if n == 5
            else None,
        )
        for n, (role, text) in enumerate(texts)
    ]


def write(store: Storage, batch: list[MessageRecord]) -> list[list[float]]:
    embeddings = vectors([embedding_text(r) for r in batch])
    store.reservoir_store(batch[0].scope, batch, embeddings)
    return embeddings


@pytest.fixture(params=["chroma", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    made: Storage
    if request.param == "chroma":
        made = ChromaStore(tmp_path / "memory", None, MODEL, chroma_process="inline")
    else:
        made = InMemoryStore(embedding_model=MODEL)
    made.open()
    yield made
    made.close()


@pytest.fixture
def filled(store: Storage) -> Storage:
    write(store, records()[:4])  # two batches, as two writes of the engine
    write(store, records()[4:])
    write(store, records(Scope("p", "j"), TEXTS[:1]))
    write(store, records(Scope("q", "i"), TEXTS[:2]))
    return store


def test_it_is_a_storage(store: Storage) -> None:
    assert isinstance(store, Storage) and isinstance(store, MemoryStore)
    assert store.in_process and store.single_writer  # both, as configured here
    assert store.embedding_model == MODEL
    store.probe()
    assert store.embed(["text"]) is None  # inline Chroma embeds nothing itself


def test_an_unknown_scope_is_empty(store: Storage) -> None:
    nobody = Scope("nobody", "here")
    assert store.count(nobody) == 0 and store.scopes() == []
    assert store.recent(nobody, 5) == [] and store.get(nobody, ["x"]) == []
    assert store.query(nobody, vectors(["x"])[0], 3) == []
    assert store.nearest(nobody, vectors(["x"])[0], 3) == []
    assert store.documents(nobody, 0, 10) == [] and store.keyword(nobody, ["x"], 5) == []
    assert store.existing_ids(nobody, ["x"]) == set()
    assert store.traces_present(nobody, ["t0"]) == set()
    assert store.tail(nobody) == (0, None, None)
    assert list(store.pages(nobody)) == []


def test_scopes_and_counts(filled: Storage) -> None:
    assert filled.scopes() == [Scope("p", "i"), Scope("p", "j"), Scope("q", "i")]
    assert filled.scopes("p") == [Scope("p", "i"), Scope("p", "j")]
    assert filled.scopes("nope") == []
    assert [filled.count(s) for s in filled.scopes()] == [6, 1, 2]


def test_records_come_back_as_written(filled: Storage) -> None:
    written = {r.id: r for r in records()}
    for record in filled.recent(SCOPE, 10):
        assert record == written[record.id]


def test_recent_is_the_newest_oldest_first(filled: Storage) -> None:
    assert [r.seq for r in filled.recent(SCOPE, 3)] == [3, 4, 5]
    assert [r.seq for r in filled.recent(SCOPE, 100)] == list(range(6))
    assert filled.recent(SCOPE, 0) == []


def test_get_by_id_in_seq_order_without_the_missing(filled: Storage) -> None:
    found = filled.get(SCOPE, ["i-4", "gone", "i-1", "i-4"])
    assert [r.id for r in found] == ["i-1", "i-4"]
    assert filled.get(SCOPE, []) == []
    assert filled.existing_ids(SCOPE, ["i-0", "gone", "j-0"]) == {"i-0"}


def test_traces_present(filled: Storage) -> None:
    assert filled.traces_present(SCOPE, ["t1", "t9", "t2"]) == {"t1", "t2"}
    assert filled.traces_present(SCOPE, []) == set()


def test_keyword_is_a_case_sensitive_substring_of_any_term(filled: Storage) -> None:
    def ids(terms: list[str], limit: int = 10) -> list[str]:
        return [r.id for r in filled.keyword(SCOPE, terms, limit)]

    assert ids(["Sichuan"]) == ["i-2", "i-3"]
    assert ids(["sichuan"]) == []  # case-sensitive, as Chroma's $contains
    assert ids(["greyhound", "marathon"]) == ["i-0", "i-4", "i-5"]
    assert ids(["ichua"]) == ["i-2", "i-3"]  # any part of a word
    assert ids(["", "Comet"]) == ["i-0", "i-1"] and ids([""]) == []
    assert len(ids(["o"], limit=2)) == 2


def test_query_and_nearest_rank_by_cosine(filled: Storage) -> None:
    question = "What kind of dog do I have?"
    (asked,) = vectors([question])
    hits = filled.query(SCOPE, asked, 3)
    assert hits[0][0].id == "i-0"
    stored = np.asarray(vectors([embedding_text(r) for r in records()]))
    exact = stored @ np.asarray(asked) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(asked))
    expected = [f"i-{n}" for n in np.argsort(-exact)[:3]]
    assert [r.id for r, _ in hits] == expected
    for record, similarity in hits:
        assert similarity == pytest.approx(exact[record.seq], abs=1e-3)
    assert [(i, round(s, 3)) for i, s in filled.nearest(SCOPE, asked, 3)] == [
        (r.id, round(s, 3)) for r, s in hits
    ]
    assert filled.query(SCOPE, asked, 0) == [] and filled.nearest(SCOPE, asked, 0) == []


def test_documents_page_through_every_message_once(filled: Storage) -> None:
    pages = [filled.documents(SCOPE, offset, 4) for offset in (0, 4, 8)]
    assert [len(p) for p in pages] == [4, 2, 0]
    texts = {r.id: r.text for r in records()}
    assert dict(pages[0] + pages[1]) == texts
    newer = filled.documents(SCOPE, 0, 10, min_seq=4)
    assert sorted(newer) == [("i-4", TEXTS[4][1]), ("i-5", TEXTS[5][1])]
    assert filled.documents(SCOPE, 0, 10) == pages[0] + pages[1]  # a stable order


def test_tail_is_the_next_number_and_the_last_message(filled: Storage) -> None:
    next_seq, last, vector = filled.tail(SCOPE)
    assert next_seq == 6 and last is not None and last.id == "i-5"
    assert vector == pytest.approx(vectors([embedding_text(last)])[0], abs=1e-6)


def test_an_upsert_replaces_a_message(filled: Storage) -> None:
    changed = replace(records()[2], text="My favourite food is ramen.")
    write(filled, [changed])
    assert filled.count(SCOPE) == 6
    assert [r.text for r in filled.get(SCOPE, ["i-2"])] == ["My favourite food is ramen."]
    assert [r.id for r in filled.keyword(SCOPE, ["ramen"], 5)] == ["i-2"]


def test_delete_forgets_the_scope_only(filled: Storage) -> None:
    filled.reservoir_delete(SCOPE)
    filled.forget(SCOPE)
    assert filled.count(SCOPE) == 0 and filled.recent(SCOPE, 5) == []
    assert filled.scopes() == [Scope("p", "j"), Scope("q", "i")]
    assert filled.tail(SCOPE) == (0, None, None)
    write(filled, records()[:1])  # a deleted scope can start again
    assert [r.id for r in filled.recent(SCOPE, 5)] == ["i-0"]


def test_pages_are_oldest_first_with_embeddings_on_request(filled: Storage) -> None:
    pages = list(filled.pages(SCOPE, size=4))
    assert [[r.seq for r, _ in page] for page in pages] == [[0, 1, 2, 3], [4, 5]]
    assert all(v is None for page in pages for _, v in page)
    (whole,) = filled.pages(SCOPE, embeddings=True, size=10)
    for record, vector in whole:
        assert vector == pytest.approx(vectors([embedding_text(record)])[0], abs=1e-6)


def test_stats_and_description(filled: Storage) -> None:
    rows = {s.scope: (s.messages, s.embedding_model) for s in filled.scope_stats()}
    assert rows == {
        Scope("p", "i"): (6, MODEL),
        Scope("p", "j"): (1, MODEL),
        Scope("q", "i"): (2, MODEL),
    }
    where = filled.describe()
    assert isinstance(where, Location) and where.description
    assert where.disk_bytes is None or where.disk_bytes > 0


def test_reembed_gives_new_vectors_once_and_then_reads_refuse_the_old_model(
    filled: Storage,
) -> None:
    def reversed_vectors(texts: list[str]) -> list[list[float]]:
        return [list(reversed(v)) for v in vectors(texts)]

    told: list[int] = []
    assert filled.reembed(reversed_vectors, "reversed", told.append) == 9
    assert sum(told) == 9
    assert {s.embedding_model for s in filled.scope_stats()} == {"reversed"}
    with pytest.raises(EmbeddingMismatch):
        filled.count(SCOPE)  # the store is still configured for the old model
    assert filled.reembed(reversed_vectors, "reversed") == 0  # done: nothing again
    (whole,) = filled.pages(SCOPE, embeddings=True, size=10)
    for record, vector in whole:
        assert record.embedding_model == "reversed"
        expected = reversed_vectors([embedding_text(record)])[0]
        assert vector == pytest.approx(expected, abs=1e-6)


def test_passages_lift_their_message_and_are_no_messages(filled: Storage) -> None:
    """A long message's passages (what the model does not read of it) count in
    the dense search, its best vector scoring it, and nowhere else."""
    long = replace(records()[0], id="i-6", seq=6, role="assistant", text=LONG_ANSWER)
    (pieces,) = embedder().split_passages([LONG_ANSWER])
    assert len(pieces) >= 3
    own, *more = vectors([LONG_ANSWER, *pieces])
    filled.reservoir_store(SCOPE, [long], [own], [more])
    (asked,) = vectors([QUESTION])
    exact = [float(np.dot(v, asked)) for v in (own, *more)]
    assert max(exact[1:]) > exact[0] + 0.2  # the fact is in a passage only
    # its best vector scores it, a passage's similarity lowered by the discount
    best = max(exact[0], max(exact[1:]) - PASSAGE_DISCOUNT)

    def check() -> None:
        found = filled.nearest(SCOPE, asked, 3)
        assert found[0][0] == "i-6" and found[0][1] == pytest.approx(best, abs=1e-3)
        assert len({i for i, _ in found}) == 3  # each message once
        hits = filled.query(SCOPE, asked, 3)
        assert [(r.id, round(s, 3)) for r, s in hits] == [(i, round(s, 3)) for i, s in found]
        assert hits[0][0] == long

    check()  # (Chroma: read from Chroma while the scope's copy loads)
    assert len(filled.documents(SCOPE, 0, 100)) == 7  # (waits for the copy)
    check()  # (from the in-memory index)
    assert filled.count(SCOPE) == 7 and len(filled.recent(SCOPE, 100)) == 7
    assert [len(page) for page in filled.pages(SCOPE)] == [7]
    assert {s.scope: s.messages for s in filled.scope_stats()}[SCOPE] == 7
    assert filled.get(SCOPE, ["i-6#1"]) == [] and filled.existing_ids(SCOPE, ["i-6#1"]) == set()
    assert filled.scopes() == [Scope("p", "i"), Scope("p", "j"), Scope("q", "i")]

    write(
        filled, [replace(long, text="Thanks, that is all for today.")]
    )  # written again: no passages
    assert "i-6" not in [i for i, _ in filled.nearest(SCOPE, asked, 2)]
    filled.forget(SCOPE)  # (Chroma: from Chroma again)
    assert "i-6" not in [i for i, _ in filled.nearest(SCOPE, asked, 2)]

    filled.reservoir_store(SCOPE, [long], [own], [more])
    filled.reservoir_delete(SCOPE)
    filled.forget(SCOPE)
    write(filled, [replace(long, text="Thanks, that is all for today.")])  # the scope anew
    assert filled.nearest(SCOPE, asked, 3)[0][1] == pytest.approx(
        float(np.dot(vectors(["Thanks, that is all for today."])[0], asked)), abs=1e-3
    )


def test_remove_messages_forgets_those_only_with_their_passages(filled: Storage) -> None:
    """A removed message is gone from every read (its passages too); the others
    stay as they were, vectors included; links to it are left; an empty scope goes."""
    long = replace(records()[0], id="i-6", seq=6, role="assistant", text=LONG_ANSWER)
    (pieces,) = embedder().split_passages([LONG_ANSWER])
    own, *more = vectors([LONG_ANSWER, *pieces])
    filled.reservoir_store(SCOPE, [long], [own], [more])
    assert filled.documents(SCOPE, 0, 100)  # (Chroma: its in-memory copy loaded)
    (asked,) = vectors([QUESTION])
    before = {r.id: v for page in filled.pages(SCOPE, embeddings=True) for r, v in page}

    removed = filled.remove_messages(SCOPE, ["i-6", "i-2", "nope"])
    assert removed == [long, records()[2]]
    assert filled.remove_messages(SCOPE, ["i-2"]) == []
    kept = ["i-0", "i-1", "i-3", "i-4", "i-5"]
    assert [r.id for r in filled.recent(SCOPE, 100)] == kept
    assert filled.count(SCOPE) == 5
    assert filled.get(SCOPE, ["i-2", "i-3", "i-6"]) == [records()[3]]
    assert filled.existing_ids(SCOPE, ["i-2", "i-3"]) == {"i-3"}
    assert sorted(i for i, _ in filled.documents(SCOPE, 0, 100)) == kept
    assert filled.keyword(SCOPE, [records()[2].text[:12]], 10) == []
    assert all(i in kept for i, _ in filled.nearest(SCOPE, asked, 10))
    assert [r.id for r, _ in filled.query(SCOPE, asked, 10)] == [
        i for i, _ in filled.nearest(SCOPE, asked, 10)
    ]
    after = {r.id: v for page in filled.pages(SCOPE, embeddings=True) for r, v in page}
    assert sorted(after) == kept
    for id_, vector in after.items():
        assert vector == pytest.approx(before[id_], abs=1e-6)
    assert filled.get(SCOPE, ["i-3"])[0].before_id == "i-2"  # left: reads leave it out
    assert filled.tail(SCOPE)[0] == 6
    assert filled.scopes() == [SCOPE, Scope("p", "j"), Scope("q", "i")]

    assert [r.id for r in filled.remove_messages(Scope("p", "j"), ["j-0"])] == ["j-0"]
    assert filled.scopes() == [SCOPE, Scope("q", "i")]
    assert filled.remove_messages(Scope("p", "gone"), ["x"]) == []
