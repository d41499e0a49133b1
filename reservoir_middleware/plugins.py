"""A small typed facade over the pluggy hooks, with per-plugin failure isolation.

pluggy stops a hook call at the first exception; a memory plugin must not take
the whole request down with it. So each implementation is called on its own,
in pluggy's order (tryfirst first, later-registered first), its failure logged
with its plugin name and collected, and the others still run.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import pluggy

from reservoir_middleware import hookspecs
from reservoir_middleware._logs import log_failure
from reservoir_middleware.context import Candidate, ContextPlan, RetrievalQuery, TokenBudget
from reservoir_middleware.records import MessageRecord, Scope

if TYPE_CHECKING:
    from reservoir_middleware.store import MemoryStore


ENTRY_POINT_GROUP = "reservoir"


@dataclass
class PluginFailure:
    plugin: str
    hook: str
    error: BaseException

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} failed in {self.hook}: {self.error!r}"


@dataclass
class Outcome:
    """What a hook call produced, and which plugins failed on the way."""

    results: list[tuple[str, Any]] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """What the `reservoir_authorize` plugins said about one request."""

    granted: bool = False  # a plugin returned True
    denied_by: str | None = None  # the plugin that returned False
    failure: PluginFailure | None = None  # the plugin that failed (a denial too)


def make_plugin_manager(
    builtins: Iterable[tuple[str, object]],
    extra: Sequence[object] = (),
    *,
    disabled: Iterable[str] = (),
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """Built-ins first, then entry points, then plugins passed in code."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for blocked in disabled:
        pm.set_blocked(blocked)
    for builtin_name, builtin in builtins:
        pm.register(builtin, name=builtin_name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        label = getattr(plugin, "name", None) or getattr(plugin, "__name__", None)
        plugin_name = str(label) if label else None
        if plugin_name and pm.is_blocked(plugin_name):
            continue
        unique = plugin_name if plugin_name and not pm.has_plugin(plugin_name) else None
        pm.register(plugin, name=unique)
    return pm


class Hooks:
    """Typed calls to every hook, each implementation isolated from the others."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    async def _invoke(self, impl: Any, hook: str, kwargs: dict[str, Any], outcome: Outcome) -> Any:
        """Call one implementation; a failure is logged, recorded and yields None.

        An argument the implementation gives a default (the stores' `passages`,
        so that they can be called without it) gets the call's value, as in
        pluggy's own calls."""
        args = [kwargs[name] for name in impl.argnames]
        extra = {name: kwargs[name] for name in impl.kwargnames if name in kwargs}
        function = functools.partial(impl.function, **extra) if extra else impl.function
        try:
            if inspect.iscoroutinefunction(impl.function):
                return await function(*args)
            result = await anyio.to_thread.run_sync(function, *args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:  # a plugin must not break traffic
            failure = PluginFailure(impl.plugin_name, hook, exc)
            log_failure(f"plugin {impl.plugin_name!r} failed in {hook}", exc)
            outcome.failures.append(failure)
            return None

    def _impls(self, hook: str) -> list[Any]:
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def implemented(self, hook: str) -> bool:
        """Whether any plugin implements `hook` (work for nobody can be skipped)."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    async def _call(self, hook: str, kwargs: dict[str, Any], *, first: bool = False) -> Outcome:
        outcome = Outcome()
        for impl in self._impls(hook):
            result = await self._invoke(impl, hook, kwargs, outcome)
            if result is not None:
                outcome.results.append((impl.plugin_name, result))
                if first:
                    break
        return outcome

    async def rewrite_request(
        self, body: dict[str, Any], scope: Scope
    ) -> tuple[dict[str, Any], Outcome]:
        outcome = Outcome()
        hook = "reservoir_rewrite_request"
        for impl in self._impls(hook):
            result = await self._invoke(impl, hook, {"body": body, "scope": scope}, outcome)
            if isinstance(result, dict):
                body = result
        return body, outcome

    async def authorize(self, scope: Scope, key: str | None, headers: Mapping[str, str]) -> Verdict:
        """Fail closed, unlike the other hooks: the first False or failure decides.
        A result that is not True, False or None is a failure (a typo must not allow)."""
        hook = "reservoir_authorize"
        kwargs = {"scope": scope, "key": key, "headers": headers}
        granted = False
        for impl in self._impls(hook):
            outcome = Outcome()
            result = await self._invoke(impl, hook, kwargs, outcome)
            if result is not None and not isinstance(result, bool):
                error = TypeError(f"returned {type(result).__name__}, not True, False or None")
                log_failure(f"plugin {impl.plugin_name!r} failed in {hook}", error)
                outcome.failures.append(PluginFailure(impl.plugin_name, hook, error))
            if outcome.failures:
                return Verdict(failure=outcome.failures[0])
            if result is False:
                return Verdict(denied_by=impl.plugin_name)
            granted = granted or result is True
        return Verdict(granted=granted)

    async def prepare_record(self, record: MessageRecord) -> tuple[MessageRecord | None, Outcome]:
        outcome = Outcome()
        hook = "reservoir_prepare_record"
        current: MessageRecord | None = record
        for impl in self._impls(hook):
            if current is None:
                break
            result = await self._invoke(impl, hook, {"record": current}, outcome)
            if result is False:
                current = None
            elif isinstance(result, MessageRecord):
                current = result
        return current, outcome

    async def store(
        self,
        scope: Scope,
        records: list[MessageRecord],
        embeddings: list[list[float]],
        passages: list[list[list[float]]] | None = None,
    ) -> Outcome:
        kwargs = {
            "scope": scope,
            "records": records,
            "embeddings": embeddings,
            "passages": passages if passages is not None else [[] for _ in records],
        }
        return await self._call("reservoir_store", kwargs)

    async def _gather(self, hook: str, kwargs: dict[str, Any]) -> Outcome:
        """Every implementation at once (independent reads)."""
        outcome = Outcome()
        impls = self._impls(hook)
        results = await asyncio.gather(*(self._invoke(i, hook, kwargs, outcome) for i in impls))
        outcome.results = [
            (impl.plugin_name, result)
            for impl, result in zip(impls, results, strict=True)
            if result is not None
        ]
        return outcome

    async def prefetch(self, query: RetrievalQuery, store: MemoryStore) -> Outcome:
        return await self._gather("reservoir_prefetch", {"query": query, "store": store})

    async def retrieve(self, query: RetrievalQuery, store: MemoryStore) -> Outcome:
        """All retrieval plugins at once: they are independent reads."""
        outcome = await self._gather("reservoir_retrieve", {"query": query, "store": store})
        outcome.results = [
            (name, [c for c in result if isinstance(c, Candidate)])
            for name, result in outcome.results
            if isinstance(result, list)
        ]
        return outcome

    async def truncate(
        self, plan: ContextPlan, budget: TokenBudget
    ) -> tuple[ContextPlan | None, Outcome]:
        outcome = await self._call(
            "reservoir_truncate", {"plan": plan, "budget": budget}, first=True
        )
        for _, result in outcome.results:
            if isinstance(result, ContextPlan):
                return result, outcome
        return None, outcome

    async def delete(self, scope: Scope) -> Outcome:
        return await self._call("reservoir_delete", {"scope": scope})

    async def preload(self, scope: Scope, store: MemoryStore) -> Outcome:
        return await self._call("reservoir_preload", {"scope": scope, "store": store})

    async def keyword_search(
        self, scope: Scope, text: str, limit: int, store: MemoryStore
    ) -> tuple[list[tuple[MessageRecord, float]] | None, Outcome]:
        """The first plugin's ranking (None: no plugin gave one)."""
        kwargs = {"scope": scope, "text": text, "limit": limit, "store": store}
        outcome = await self._call("reservoir_keyword_search", kwargs, first=True)
        for _, result in outcome.results:
            if isinstance(result, list):
                return result, outcome
        return None, outcome

    def describe(self) -> list[tuple[str, list[str]]]:
        """Each registered plugin with the hooks it implements."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked by name
                continue
            callers = self.pm.get_hookcallers(plugin) or []
            rows.append((name, sorted(str(c.name) for c in callers)))
        return rows
