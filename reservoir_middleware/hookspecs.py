"""The hooks a reservoir plugin can implement (pluggy project name `reservoir`).

Every hook is a plain function that may return an awaitable; the core awaits
it. A plain (non-async) implementation is called in a worker thread, so it may
block; an `async def` implementation runs on the event loop and must not.
An implementation that raises is logged with its plugin name and skipped: the
request still goes through (marked `x-reservoir-status: degraded`). The one
exception is `reservoir_authorize`, which fails closed: its failure denies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pluggy

if TYPE_CHECKING:
    from reservoir_middleware.context import Candidate, ContextPlan, RetrievalQuery, TokenBudget
    from reservoir_middleware.records import MessageRecord, Scope
    from reservoir_middleware.store import MemoryStore

PROJECT = "reservoir"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def reservoir_authorize(
    scope: Scope, key: str | None, headers: Mapping[str, str]
) -> bool | Awaitable[bool | None] | None:
    """Decide whether a chat request may read and write the memory of `scope`.

    Called once per chat request through the middleware (the plain route's
    partition `default` included), in plugin order until one denies, before
    the body is read or memory touched. `key` is the request's key
    (`X-Reservoir-Key`, else the `Authorization: Bearer` token; None when
    neither is sent); `headers` are all the request headers (case-insensitive).
    Return True to grant, False to deny (any False denies, whatever the
    others say), or None for no opinion. With `partition_keys` configured a
    request nobody granted is denied; without, a request nobody denied goes
    through. A denied request gets a 401 (no key) or 403 (a key); the wrapped
    app is not called. Fails closed: an implementation that raises, returns
    anything else, or makes the check outlast `memory_timeout_ms` denies the
    request (503), and the failure is logged with the plugin name.
    """


@hookspec
def reservoir_rewrite_request(
    body: dict[str, Any], scope: Scope
) -> dict[str, Any] | Awaitable[dict[str, Any] | None] | None:
    """Rewrite a chat request before it is stored and enriched.

    Called once per chat request, in plugin order, each seeing the previous
    one's result. Return a new body dict to replace it, or None to leave it.
    The returned body is what is stored, enriched and forwarded.
    """


@hookspec
def reservoir_prepare_record(
    record: MessageRecord,
) -> MessageRecord | Literal[False] | Awaitable[MessageRecord | Literal[False] | None] | None:
    """Filter or redact one message before it is stored.

    Called for every message about to be stored (request messages, answers,
    imports), in plugin order, each seeing the previous one's result. Return a
    changed record to store that instead, None to keep it as it is, or False
    to store nothing for it. The id is already fixed from the original text,
    so a redacted message is still recognised when the client re-sends it.
    """


@hookspec
def reservoir_store(
    scope: Scope,
    records: list[MessageRecord],
    embeddings: list[list[float]],
    passages: list[list[list[float]]],
) -> Awaitable[None] | None:
    """Persist new messages of one scope.

    Called by every plugin, once per batch, with records that are not stored
    yet, their `seq` assigned, and one embedding per record. `passages[i]` are
    the vectors of record i's passages: what of a long message the embedding
    model does not read, cut into pieces (empty for most messages); the store
    keeps them so that the dense search sees all of a message. The built-in
    Chroma store writes them; an index plugin can keep its own copy (and leave
    `passages` out of its arguments). Return value is ignored.
    """


@hookspec
def reservoir_prefetch(query: RetrievalQuery, store: MemoryStore) -> Awaitable[None] | None:
    """Start on a retrieval while the core embeds the query.

    Called once per enrichment that has a query text, on every plugin, all at
    once, before `reservoir_retrieve`: `query` is what that hook will see but
    with `embedding=None`. Work that needs no embedding (a keyword index, a
    read of another store) overlaps the embedding here; keep its answer and
    return it from `reservoir_retrieve` for the same query. The core waits for
    every implementation before retrieval. Return value is ignored.
    """


@hookspec
def reservoir_retrieve(
    query: RetrievalQuery, store: MemoryStore
) -> list[Candidate] | Awaitable[list[Candidate] | None] | None:
    """Propose stored messages for the injected context.

    Called on every plugin; each returns candidates for the "semantic" or
    "recent" section (or None for none). The core fuses the semantic
    candidates of all plugins by reciprocal rank, reads the messages of
    unresolved candidates (`Candidate.resolved=False`), removes messages
    already in the request, pairs the best hits' answers, adds synapse
    neighbours, and keeps the top `semantic_context_size` (without a memory
    budget) or as many as the budget holds; recent candidates are merged by
    sequence. Propose about `query.semantic_depth` semantic candidates.
    """


@hookspec(firstresult=True)
def reservoir_truncate(
    plan: ContextPlan, budget: TokenBudget
) -> ContextPlan | Awaitable[ContextPlan | None] | None:
    """Trim a context plan to the token budget.

    The first non-None result wins (the built-in truncation is registered
    last). Return the plan to send, or None to leave the decision to the next
    plugin. System messages and the last message must be kept.
    """


@hookspec
def reservoir_delete(scope: Scope) -> Awaitable[None] | None:
    """Forget a scope entirely (called by `Reservoir.delete`).

    Called on every plugin so that indexes kept beside the store are removed
    too. Return value is ignored.
    """


@hookspec
def reservoir_preload(scope: Scope, store: MemoryStore) -> Awaitable[None] | None:
    """Load what a plugin keeps in memory for a scope now (`Reservoir.preload`).

    Called on every plugin by `Reservoir.preload` (at start-up, for the
    busiest scopes), after the store loaded its own copy of the scope, so
    that the scope's first requests do not pay for it: build an in-memory
    index from `store.documents` here. Return value is ignored.
    """


@hookspec(firstresult=True)
def reservoir_keyword_search(
    scope: Scope, text: str, limit: int, store: MemoryStore
) -> list[tuple[MessageRecord, float]] | Awaitable[list[tuple[MessageRecord, float]] | None] | None:
    """Rank a scope's messages for a keyword search (`Reservoir.search(...,
    semantic=False)`: `reservoir search --keyword`, the admin `/memory/search`).

    The first non-None result wins (the built-in `lexical` answers from its
    BM25 index). Return at most `limit` (message, score) pairs, best first,
    or None to leave it to the next plugin; when none answers, a BM25 index
    of the scope is built for the call.
    """


def documented_hooks() -> Mapping[str, str]:
    """Hook name to docstring, for the docs test and `reservoir plugins`."""
    return {
        name: (obj.__doc__ or "")
        for name, obj in globals().items()
        if name.startswith("reservoir_") and callable(obj)
    }
