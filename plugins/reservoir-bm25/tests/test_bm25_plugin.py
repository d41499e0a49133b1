"""reservoir-bm25 in a real engine: embedded Chroma, the bundled embedding model."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reservoir_bm25 import Bm25Retrieval, query_terms

from reservoir_middleware import MessageRecord, Reservoir, ReservoirSettings, Scope
from reservoir_middleware.store import MemoryStore

# The reference number is the only thing the question and this message share:
# the dense search finds it far below `min_similarity`.
TARGET = (
    "The plumber finally came on Tuesday morning, replaced the leaking valve under the kitchen "
    "sink, checked the boiler pressure and left a note about descaling the shower heads; "
    "reference 88213407 in case we need to call back."
)
OTHERS = [
    "I want to learn to bake sourdough bread this winter.",
    "My sister is visiting us in March with her two dogs.",
    "Can you recommend a good science fiction novel?",
    "We are thinking about repainting the living room in a light green.",
    "The football match on Saturday was cancelled because of the storm.",
]
QUESTION = "Do you know what 88213407 refers to?"


def make_engine(data_dir: Path, *plugins: object, **overrides: Any) -> Reservoir:
    """The engine without the built-in lexical plugin (unless asked): dense
    retrieval alone, or dense plus the plugin under test."""
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "load_entry_points": False,
        "chroma_process": "inline",  # not about the Chroma child, which takes seconds to start
        "disable_plugins": ["lexical"],
        "recent_context_size": 0,
        **overrides,
    }
    return Reservoir(ReservoirSettings(**settings), plugins)


async def injected(engine: Reservoir, question: str) -> list[str]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}
    result = await engine.enrich("p", "i", body, store=False)
    assert not result.degraded, result.failures
    return [m.text for m in result.semantic.messages]


async def remember(engine: Reservoir, *texts: str) -> None:
    await engine.add("p", "i", [{"role": "user", "content": t} for t in texts])


async def test_bm25_finds_a_rare_exact_token_that_dense_retrieval_misses(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    dense = make_engine(data)
    await remember(dense, TARGET, *OTHERS)
    hits = {h.record.text: h.score for h in await dense.search("p", "i", QUESTION, limit=10)}
    assert hits[TARGET] < dense.settings.min_similarity  # why dense alone misses it
    assert TARGET not in await injected(dense, QUESTION)

    bm25 = Bm25Retrieval(data)
    hybrid = make_engine(data, bm25)  # the same memory, the plugin added afterwards
    assert TARGET in await injected(hybrid, QUESTION)
    assert bm25.rebuilds == 1  # it had no index yet: built from the store on demand
    assert bm25.path(Scope("p", "i")).is_file()
    assert bm25.path(Scope("p", "i")).parent == data / "bm25"


async def test_the_index_is_kept_current_by_the_store_hook_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    data = tmp_path / "memory"
    bm25 = Bm25Retrieval(data)
    engine = make_engine(data, bm25)
    await remember(engine, *OTHERS)  # the scope's first batch: a complete index from seq 0
    await remember(engine, TARGET)  # a later batch, added through reservoir_store
    assert TARGET in await injected(engine, QUESTION)
    assert bm25.rebuilds == 0

    # A new process: a new engine and plugin on the same directory. The index is
    # read from disk, not rebuilt from the collection.
    restarted_plugin = Bm25Retrieval(data)
    restarted = make_engine(data, restarted_plugin)
    assert TARGET in await injected(restarted, QUESTION)
    assert restarted_plugin.rebuilds == 0


async def test_a_missing_or_stale_index_is_rebuilt_from_the_store(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    engine = make_engine(data, Bm25Retrieval(data))
    await remember(engine, TARGET, *OTHERS)
    shutil.rmtree(data / "bm25")  # lost (or never there)
    again = Bm25Retrieval(data)
    assert TARGET in await injected(make_engine(data, again), QUESTION)
    assert again.rebuilds == 1

    # Written while the plugin was disabled: the index no longer has the
    # store's size, which the first search of a process notices.
    late = "The locker at the gym has the combination 7734 and is number 5512."
    await remember(make_engine(data), late)
    fresh = Bm25Retrieval(data)
    assert late in await injected(make_engine(data, fresh), "Which locker was 5512?")
    assert fresh.rebuilds == 1


async def test_delete_removes_the_index(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    bm25 = Bm25Retrieval(data)
    engine = make_engine(data, bm25)
    await remember(engine, TARGET, *OTHERS)
    await engine.add("p", "other", [{"role": "user", "content": TARGET}])
    index = bm25.path(Scope("p", "i"))
    assert index.is_file()
    assert await engine.delete("p", "i") == 1
    assert not index.exists()
    assert bm25.path(Scope("p", "other")).is_file()  # other scopes keep theirs
    assert await injected(engine, QUESTION) == []
    assert not index.exists()  # nothing stored, nothing to rebuild


async def test_it_coexists_with_the_built_in_lexical_plugin(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    engine = make_engine(data, Bm25Retrieval(data), disable_plugins=[])
    names = dict(engine.hooks.describe())
    assert names["bm25"] == ["reservoir_delete", "reservoir_retrieve", "reservoir_store"]
    assert "lexical" in names
    await remember(engine, TARGET, *OTHERS)
    assert TARGET in await injected(engine, QUESTION)


async def test_partition_scope_searches_every_instance(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    engine = make_engine(data, Bm25Retrieval(data), semantic_scope="partition")
    await engine.add("p", "laptop", [{"role": "user", "content": TARGET}])
    await engine.add("p", "phone", [{"role": "user", "content": OTHERS[0]}])
    await engine.add("q", "laptop", [{"role": "user", "content": TARGET + " (other partition)"}])
    assert await injected(engine, QUESTION) == [TARGET]


class GatedStore:
    """The engine's real store, whose `documents` (what a rebuild reads) waits
    for a gate: a rebuild that takes its time."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.reading = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def documents(
        self, scope: Scope, offset: int, limit: int, min_seq: int | None = None
    ) -> list[tuple[str, str]]:
        self.reading.set()
        assert self.gate.wait(10)
        assert min_seq is None  # the plugin reads every message
        return self.store.documents(scope, offset, limit)


def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def ids(found: Sequence[tuple[str, float]]) -> list[str]:
    return [id_ for id_, _ in found]


async def test_a_large_scope_is_rebuilt_in_the_background(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    engine = make_engine(data)
    await remember(engine, TARGET, *OTHERS)
    scope = Scope("p", "i")
    target_id = next(r.id for r in await engine.recent("p", "i") if r.text == TARGET)
    bm25 = Bm25Retrieval(data, blocking_rebuild=2)  # "large": more than 2 messages
    slow = GatedStore(engine.store)
    assert bm25.top(scope, ["88213407"], 5, slow) == []  # no index yet: nothing, at once
    assert slow.reading.wait(10)
    # Written while the rebuild reads the store: kept for the new index.
    late = MessageRecord("late-id", "p", "i", "user", "Locker 5512 is mine.", seq=6)
    bm25.reservoir_store(scope, [late], [[0.0]])
    slow.gate.set()
    eventually(lambda: bm25.rebuilds == 1)
    assert ids(bm25.top(scope, ["88213407"], 5, engine.store)) == [target_id]
    assert ids(bm25.top(scope, ["5512"], 5, engine.store)) == ["late-id"]

    # A delete while a rebuild is under way wins: the rebuild is discarded.
    again = Bm25Retrieval(data, blocking_rebuild=2)
    gated = GatedStore(engine.store)
    shutil.rmtree(data / "bm25")
    assert again.top(scope, ["88213407"], 5, gated) == []
    assert gated.reading.wait(10)
    again.reservoir_delete(scope)
    gated.gate.set()
    eventually(lambda: not any(t.name == "reservoir-bm25-rebuild" for t in threading.enumerate()))
    assert again.rebuilds == 0 and not again.path(scope).exists()


def test_query_terms() -> None:
    assert query_terms("What is the status of QX7-4417-ZB, and of qx7?") == [
        "status",
        "qx7",
        "4417",
        "zb",
    ]
    assert query_terms("Is it a 5?") == ["5"]
    assert query_terms('the "quoted" OR NEAR(x)') == ["quoted", "near"]


def loose_entries(root: Path) -> list[str]:
    """The entries under `root` (and itself) that group or others may access."""
    return [
        f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.name}"
        for p in [root, *root.rglob("*")]
        if stat.S_IMODE(p.lstat().st_mode) & 0o077
    ]


async def test_the_index_files_are_private_under_the_usual_umask(tmp_path: Path) -> None:
    """Index terms reveal the conversations: the directory 0700, the files 0600,
    whether written by the store hook or rebuilt, and older loose ones tightened."""
    old = os.umask(0o022)
    try:
        data = tmp_path / "memory"
        engine = make_engine(data, Bm25Retrieval(data))
        await remember(engine, *OTHERS)
        await remember(engine, TARGET)
        index = data / "bm25"
        assert TARGET in await injected(engine, QUESTION)
        assert list(index.glob("*.sqlite3")) and loose_entries(index) == []

        shutil.rmtree(index)  # rebuilt from the store: a temporary file swapped in
        rebuilt = Bm25Retrieval(data)
        assert TARGET in await injected(make_engine(data, rebuilt), QUESTION)
        assert rebuilt.rebuilds == 1
        assert list(index.glob("*.sqlite3")) and loose_entries(index) == []

        for path in [index, *index.rglob("*")]:  # as an older version left them
            path.chmod(0o755 if path.is_dir() else 0o644)
        later = Bm25Retrieval(data)
        assert TARGET in await injected(make_engine(data, later), QUESTION)
        assert later.rebuilds == 0 and loose_entries(index) == []
    finally:
        os.umask(old)
