"""The built-in lexical retrieval: BM25 over every message of a scope, in memory.

The dense (embedding) search misses what only a rare word pins down: a name,
a place, a product, a number. This plugin ranks the scope's messages by BM25
(k1 = 1.2, b = 0.75) over `search.terms()` (stop words removed, light
stemming) and proposes the best ones for the "semantic" section, where the
core fuses them with the dense candidates by reciprocal rank and reads the
messages that survive from the store.

The index of a scope lives in this process's memory:

- **Built lazily**, on the first retrieval of the scope, from the texts in the
  store (read in pages, in a worker thread). A scope of up to
  `BLOCKING_BUILD` messages is indexed on that request (about 60 ms per
  thousand messages with embedded Chroma, most of it reading the texts; once);
  a larger one is indexed in a background thread (10k messages: about 0.7 s,
  100k: about 5 s) and the requests meanwhile go on without lexical
  candidates.
- **Kept current** by this plugin's own `reservoir_store` (called after the
  Chroma store's, so what is indexed is stored) and dropped by
  `reservoir_delete`. A message written while an index is being built is
  added once the build is done.
- **Checked** at most every `REFRESH_S` seconds per scope, in a background
  thread: when the store's count of the scope differs from the index, which
  happens when another process writes (several gateway workers on one Chroma
  server, `chroma_url`) or deletes (the CLI), the messages numbered from the
  index's size on are read and added; if the counts still differ, the index
  is rebuilt in the background while the old one serves. Until then such a
  process's newest messages are found by the dense search only.
- **Bounded**: beyond `max_messages` indexed messages in all scopes
  (`lexical_max_messages`), the least recently searched scopes are dropped
  and rebuilt when searched again.

Scoring is vectorised: each term's postings (message numbers and term
frequencies) are compact arrays accumulated with numpy, so a query costs
about the total length of its terms' postings, not one Python step per
message.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reservoir_middleware import _gcfreeze as gcfreeze
from reservoir_middleware._logs import log_failure
from reservoir_middleware.builtins._bm25 import NEIGHBOUR_WEIGHT
from reservoir_middleware.builtins._bm25 import Bm25Index as Bm25Index
from reservoir_middleware.builtins.retrieval import reference
from reservoir_middleware.context import Candidate, RetrievalQuery
from reservoir_middleware.hookspecs import hookimpl
from reservoir_middleware.memory.keywords import terms
from reservoir_middleware.records import MessageRecord, Scope
from reservoir_middleware.store import MemoryStore

BLOCKING_BUILD = 1_000  # messages: a larger scope is indexed in the background
PAGE = 1_000  # messages read from the store at a time while building
REFRESH_S = 5.0  # the most often a scope's count is compared with its index
CATCH_UP_SLACK = 64  # messages before the index's size re-read when catching up
MAX_MESSAGES = 500_000
PREFETCHED = 64  # queries scored ahead and not (yet) asked for


@dataclass
class _Entry:
    """The index of one scope and its upkeep (fields guarded by the plugin's lock)."""

    index: Bm25Index | None = None  # None until the first build is done
    buffer: list[tuple[str, str]] | None = None  # writes that arrive while a build reads
    background: bool = False  # a background build or check is on its way
    build_lock: threading.Lock = field(default_factory=threading.Lock)
    checked: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)


class LexicalRetrieval:
    """BM25 candidates for the semantic section, from an in-memory index per scope."""

    name = "lexical"

    def __init__(
        self,
        *,
        max_messages: int = MAX_MESSAGES,
        blocking_build: int = BLOCKING_BUILD,
        refresh_s: float = REFRESH_S,
        neighbour_weight: float = NEIGHBOUR_WEIGHT,
    ) -> None:
        self.max_messages = max_messages
        self.neighbour_weight = neighbour_weight
        self.blocking_build = blocking_build
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._indexed = 0  # messages in all installed indexes
        # answers scored ahead by `prefetch`, taken by the hook of the same query
        self._prefetched: OrderedDict[tuple[object, ...], list[Candidate] | None] = OrderedDict()

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    def reservoir_retrieve(
        self, query: RetrievalQuery, store: MemoryStore
    ) -> list[Candidate] | None:
        with self._lock:
            key = _prefetch_key(query)
            if key in self._prefetched:
                return self._prefetched.pop(key)
        return self._candidates(query, store)

    @hookimpl
    def reservoir_prefetch(self, query: RetrievalQuery, store: MemoryStore) -> None:
        """Score a query ahead (while the core embeds it): BM25 needs no
        embedding; `reservoir_retrieve` then returns this answer instead of
        scoring again. A failure is left for that hook to meet (and report)."""
        try:
            found = self._candidates(query, store)
        except Exception:
            return
        with self._lock:
            self._prefetched[_prefetch_key(query)] = found
            while len(self._prefetched) > PREFETCHED:
                self._prefetched.popitem(last=False)

    def _candidates(self, query: RetrievalQuery, store: MemoryStore) -> list[Candidate] | None:
        query_terms = terms(query.text)
        if query.semantic_limit <= 0 or not query_terms:
            return None
        want = query.semantic_depth
        ranked: list[tuple[float, Scope, str]] = []
        for scope in query.search_scopes(store):
            index = self.index(scope, store)
            if index is not None:
                ranked.extend((score, scope, id_) for id_, score in index.top(query_terms, want))
        ranked.sort(key=lambda hit: hit[0], reverse=True)  # like the dense search: per scope
        return [
            Candidate(reference(scope, id_), "semantic", score, self.name, resolved=False)
            for score, scope, id_ in ranked
        ]

    @hookimpl(trylast=True)  # after the Chroma store's: what is indexed is stored
    def reservoir_store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        records = sorted(records, key=lambda r: r.seq)  # the scope's order
        docs = [(r.id, r.text) for r in records]
        with self._lock:
            entry = self._entries.get(scope.key)
            if entry is None:
                return  # not indexed: a build reads these from the store
            if entry.buffer is not None:
                entry.buffer.extend(docs)
            index = entry.index
        if index is not None and records:
            self._add(scope, entry, index, docs, continues=records[0].before_id == index.last_id)

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        self.forget(scope)

    @hookimpl
    def reservoir_preload(self, scope: Scope, store: MemoryStore) -> None:
        self.preload(scope, store)

    @hookimpl
    def reservoir_keyword_search(
        self, scope: Scope, text: str, limit: int, store: MemoryStore
    ) -> list[tuple[MessageRecord, float]]:
        """The scope's messages ranked by BM25, best first, with the index and
        tokenizer the request path uses: the keyword search of the CLI and admin API."""
        query_terms = terms(text)
        ranked = self.ranked(scope, store, query_terms, 2 * limit)
        if not ranked:
            return []
        found = {r.id: r for r in store.get(scope, [id_ for id_, _ in ranked])}
        # a keyword search lists the messages that hold a word of the query, not
        # those found through their neighbours' words only
        wanted = set(query_terms)
        return [
            (found[id_], score)
            for id_, score in ranked
            if id_ in found and not wanted.isdisjoint(terms(found[id_].text))
        ][:limit]

    # -- the indexes -------------------------------------------------------------------

    def forget(self, scope: Scope) -> None:
        with self._lock:
            entry = self._entries.pop(scope.key, None)
            if entry is not None and entry.index is not None:
                self._indexed -= len(entry.index)

    def index(self, scope: Scope, store: MemoryStore) -> Bm25Index | None:
        """The scope's index, built now if it is small; None while a large one builds."""
        with self._lock:
            entry = self._entries.get(scope.key)
            if entry is None:
                entry = self._entries[scope.key] = _Entry()
            entry.used = time.monotonic()
            index, busy = entry.index, entry.background
        if index is not None:
            # a single writer (embedded Chroma) keeps it current through `reservoir_store`
            others_write = not getattr(store, "single_writer", False)
            if others_write and not busy and time.monotonic() - entry.checked >= self.refresh_s:
                self._in_background(scope, store, entry, self._catch_up)
            return index
        if busy:
            return None
        if store.count(scope) > self.blocking_build:
            self._in_background(scope, store, entry, self._build)
            return None
        with entry.build_lock:  # a concurrent first request waits for this build
            if entry.index is None:
                self._build(scope, store, entry)
        return entry.index

    def ranked(
        self, scope: Scope, store: MemoryStore, query_terms: Sequence[str], limit: int
    ) -> list[tuple[str, float]]:
        """The scope's best (id, score) for these terms, the index brought up
        to date first (built, or caught up with what others wrote): the
        keyword search of the CLI and admin API, ranked as requests rank."""
        if not query_terms or limit <= 0:
            return []
        self.preload(scope, store)
        with self._lock:
            entry = self._entries.get(scope.key)
        if entry is None or entry.index is None:
            return []
        if not getattr(store, "single_writer", False):
            with entry.build_lock:
                self._catch_up(scope, store, entry)
        return entry.index.top(query_terms, limit)

    def preload(self, scope: Scope, store: MemoryStore) -> None:
        """Build the scope's index now (blocking), unless it is built already."""
        with self._lock:
            entry = self._entries.setdefault(scope.key, _Entry())
            entry.used = time.monotonic()
        with entry.build_lock:  # waits for a build in the background, if any
            if entry.index is None:
                self._build(scope, store, entry)

    def _add(
        self,
        scope: Scope,
        entry: _Entry,
        index: Bm25Index,
        docs: list[tuple[str, str]],
        *,
        continues: bool = True,
    ) -> None:
        added = index.add(docs, continues=continues)
        with self._lock:
            if self._entries.get(scope.key) is entry and entry.index is index:
                self._indexed += added
        if added:
            self._evict()

    def _build(self, scope: Scope, store: MemoryStore, entry: _Entry) -> None:
        """Read every text of the scope into a new index, then install it with
        the writes that arrived meanwhile. The caller holds `entry.build_lock`."""
        with self._lock:
            entry.buffer = []
        try:
            index = Bm25Index(self.neighbour_weight)
            index.add(_read(store, scope, None))
        finally:
            with self._lock:
                pending, entry.buffer = entry.buffer, None
        index.add(pending or [])
        with self._lock:
            old = entry.index
            entry.index = index
            entry.checked = time.monotonic()
            if self._entries.get(scope.key) is entry:  # not deleted meanwhile
                self._indexed += len(index) - (len(old) if old is not None else 0)
        self._evict()
        gcfreeze.loaded(len(index))

    def _catch_up(self, scope: Scope, store: MemoryStore, entry: _Entry) -> None:
        """Compare the store's count with the index; add what others wrote,
        rebuild if that does not make them equal. The caller holds `build_lock`."""
        with self._lock:
            entry.checked = time.monotonic()
            index = entry.index
        if index is None or store.count(scope) == len(index):
            return
        self._add(scope, entry, index, _read(store, scope, max(0, len(index) - CATCH_UP_SLACK)))
        if store.count(scope) != len(index):
            self._build(scope, store, entry)

    def _in_background(
        self,
        scope: Scope,
        store: MemoryStore,
        entry: _Entry,
        work: Callable[[Scope, MemoryStore, _Entry], None],
    ) -> None:
        with self._lock:
            if entry.background:
                return
            entry.background = True
            entry.checked = time.monotonic()

        def run() -> None:
            try:
                with entry.build_lock:
                    work(scope, store, entry)
            except Exception as exc:
                log_failure(f"the lexical index of {scope} could not be brought up to date", exc)
            finally:
                with self._lock:
                    entry.background = False

        threading.Thread(target=run, name="rsv-lexical-index", daemon=True).start()

    def _evict(self) -> None:
        """Drop the least recently searched indexes beyond `max_messages`; the
        most recently searched one stays, whatever its size."""
        with self._lock:
            if self._indexed <= self.max_messages:
                return
            built = [(e.used, k) for k, e in self._entries.items() if e.index is not None]
            for _, key in sorted(built)[:-1]:
                if self._indexed <= self.max_messages:
                    break
                entry = self._entries.pop(key)
                self._indexed -= len(entry.index) if entry.index is not None else 0


def _prefetch_key(query: RetrievalQuery) -> tuple[object, ...]:
    return (query.scope, query.text, query.semantic_depth, query.semantic_scope)


def _read(store: MemoryStore, scope: Scope, min_seq: int | None) -> list[tuple[str, str]]:
    """Every (id, text) of the scope (numbered `min_seq` or more, if given), page by page."""
    out: list[tuple[str, str]] = []
    while True:
        page = store.documents(scope, len(out), PAGE, min_seq)
        out += page
        if len(page) < PAGE:
            return out
