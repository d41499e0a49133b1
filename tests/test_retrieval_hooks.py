"""The retrieval seams any plugin can use, through the public `Reservoir` API:
`reservoir_prefetch` (work while the query is embedded), `reservoir_preload`
(in-memory copies loaded at start-up), `reservoir_keyword_search` (the keyword
search of the CLI and admin API), and `RetrievalQuery.search_scopes`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import MessageRecord, Reservoir, Scope, hookimpl
from reservoir_middleware.context import Candidate, RetrievalQuery
from reservoir_middleware.store import MemoryStore
from tests.conftest import make_settings

# the built-in retrievers are off: what is injected comes from the plugin under test
ONLY_PLUGINS = "semantic,lexical,recent"
TARGET = "The spare key of the boathouse hangs behind the blue shutter."
OTHERS = ["We had pancakes on Sunday.", "The train was late again this morning."]


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def users(texts: list[str]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": t} for t in texts]


def word_hits(store: MemoryStore, scopes: list[Scope], word: str) -> list[Candidate]:
    """Messages of the scopes that contain `word`: a keyword lookup, no embedding needed."""
    found = []
    for scope in scopes:
        for record in store.recent(scope, 100):
            if word in record.text.lower():
                found.append(Candidate(record, "semantic", 1.0, "prefetching"))
    return found


class Prefetching:
    """Scores in `reservoir_prefetch` and answers `reservoir_retrieve` only from that."""

    name = "prefetching"

    def __init__(self) -> None:
        self.prefetched: dict[tuple[Scope, str], list[Candidate]] = {}
        self.seen: list[tuple[bool, bool]] = []  # (embedding was None, in a worker thread)

    @hookimpl
    def reservoir_prefetch(self, query: RetrievalQuery, store: MemoryStore) -> None:
        in_thread = threading.current_thread() is not threading.main_thread()
        self.seen.append((query.embedding is None, in_thread))
        word = query.text.lower().rstrip("?").split()[-1]
        self.prefetched[(query.scope, query.text)] = word_hits(
            store, query.search_scopes(store), word
        )

    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery) -> list[Candidate] | None:
        if not query.text:
            return None
        assert query.embedding is not None  # retrieval comes after the embedding
        return self.prefetched.pop((query.scope, query.text), None)


async def test_a_plugin_prefetches_while_the_query_is_embedded(tmp_path: Path) -> None:
    plugin = Prefetching()
    settings = make_settings(
        tmp_path, disable_plugins=ONLY_PLUGINS, semantic_scope="partition", load_entry_points=False
    )
    engine = Reservoir(settings, plugins=[plugin])
    try:
        await engine.add("p", "laptop", users([TARGET, *OTHERS]))
        result = await engine.enrich("p", "phone", chat("Where is the boathouse?"), store=False)
        assert [m.text for m in result.semantic.messages] == [TARGET]  # another instance's
        assert plugin.seen == [(True, True)]
        assert not result.degraded
        # no query text (a tool result last): nothing to prefetch
        body = {"messages": [{"role": "tool", "tool_call_id": "c1", "content": ""}]}
        await engine.enrich("p", "phone", body, store=False)
        assert plugin.seen == [(True, True)]
    finally:
        await engine.close()


class Preloading:
    """Keeps the texts of a scope in memory; only `reservoir_preload` loads them."""

    name = "preloading"

    def __init__(self) -> None:
        self.loaded: dict[Scope, list[tuple[str, str]]] = {}

    @hookimpl
    def reservoir_preload(self, scope: Scope, store: MemoryStore) -> None:
        self.loaded[scope] = store.documents(scope, 0, 1000)

    @hookimpl
    def reservoir_retrieve(self, query: RetrievalQuery) -> list[Candidate] | None:
        word = query.text.lower().rstrip("?").split()[-1]
        scope = query.scope
        return [
            Candidate(
                MessageRecord(id_, scope.partition, scope.instance, role="", text=""),
                "semantic",
                1.0,
                self.name,
                resolved=False,  # the core reads the message
            )
            for id_, text in self.loaded.get(scope, [])
            if word in text.lower()
        ]


class BrokenPreload:
    name = "broken-preload"

    @hookimpl
    def reservoir_preload(self, scope: Scope) -> None:
        raise RuntimeError(f"cannot load {scope}")


async def test_a_plugin_loads_its_copy_of_a_scope_on_preload(tmp_path: Path) -> None:
    plugin = Preloading()
    settings = make_settings(tmp_path, disable_plugins=ONLY_PLUGINS, load_entry_points=False)
    engine = Reservoir(settings, plugins=[plugin])
    try:
        await engine.add("p", "i", users([TARGET, *OTHERS]))
        before = await engine.enrich("p", "i", chat("Where is the boathouse?"), store=False)
        assert before.semantic.messages == []  # not loaded yet
        await engine.preload("p", "i")
        assert sorted(t for _, t in plugin.loaded[Scope("p", "i")]) == sorted([TARGET, *OTHERS])
        after = await engine.enrich("p", "i", chat("Where is the boathouse?"), store=False)
        assert [m.text for m in after.semantic.messages] == [TARGET]
    finally:
        await engine.close()


async def test_a_failing_preload_fails_the_preload(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, load_entry_points=False)
    engine = Reservoir(settings, plugins=[BrokenPreload()])
    try:
        await engine.add("p", "i", users(OTHERS))
        with pytest.raises(RuntimeError, match="cannot load"):
            await engine.preload("p", "i")
    finally:
        await engine.close()


class Shortest:
    """A keyword search of its own: the scope's messages that share a word, shortest first."""

    name = "shortest"

    @hookimpl
    def reservoir_keyword_search(
        self, scope: Scope, text: str, limit: int, store: MemoryStore
    ) -> list[tuple[MessageRecord, float]]:
        words = set(text.lower().split())
        found = [r for r in store.recent(scope, 100) if words & set(r.text.lower().split())]
        found.sort(key=lambda r: len(r.text))
        return [(r, 1.0 / len(r.text)) for r in found[:limit]]


async def test_a_plugin_answers_the_keyword_search(tmp_path: Path) -> None:
    long = "the train was late and the train was full and the train was cold"
    texts = ["the train", long, "a train"]
    settings = make_settings(tmp_path, load_entry_points=False)
    engine = Reservoir(settings, plugins=[Shortest()])
    try:
        await engine.add("p", "i", users(texts))
        hits = await engine.search("p", "i", "train", limit=2, semantic=False)
        assert [h.record.text for h in hits] == ["a train", "the train"]
        assert hits[0].score == pytest.approx(1 / 7)  # its score, not BM25's
    finally:
        await engine.close()


async def test_keyword_search_without_a_plugin_ranks_by_bm25(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, disable_plugins="lexical", load_entry_points=False)
    engine = Reservoir(settings)
    try:
        await engine.add("p", "i", users([TARGET, *OTHERS]))
        hits = await engine.search("p", "i", "boathouse shutter", semantic=False)
        assert [h.record.text for h in hits] == [TARGET]
    finally:
        await engine.close()
