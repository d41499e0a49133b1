"""The ASGI mechanics: read, enrich, replay, tee the answer. Knows nothing of Chroma.

Per-request state lives in `ChatExchange`, never on the middleware. Anything
that is not `POST …/chat/completions` passes through untouched, but for our
own headers (`x-reservoir-*`, and any carrying the admin key): no route of the
app ever sees them. Internal errors are logged under `reservoir` and the
request goes on un-enriched (unless `fail_open` is off); the wrapped app's own
exceptions are re-raised.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from reservoir_middleware._credentials import KeySet, app_headers, carries_admin_key
from reservoir_middleware._logs import log_failure
from reservoir_middleware.asgi._admin import match_admin_route, serve_admin
from reservoir_middleware.asgi._answer import JsonAssembler, StreamAssembler, make_assembler
from reservoir_middleware.asgi._authorization import check_access
from reservoir_middleware.asgi._replies import (
    STATUS_HEADER,
    TRACE_HEADER,
    send_error,
    send_too_long,
    status_header,
)
from reservoir_middleware.asgi._routes import ChatRoute, match_chat_route
from reservoir_middleware.engine import Enrichment, InvalidChatRequest, Reservoir
from reservoir_middleware.memory._mode import (
    InvalidMemoryMode,
    narrow,
    parse_modes,
    policy_mode,
    writes,
)
from reservoir_middleware.memory.validation import InvalidName
from reservoir_middleware.records import Scope
from reservoir_middleware.settings import MemoryMode, ReservoirSettings

DEGRADED = (STATUS_HEADER, b"degraded")
# Set in every scope the wrapped app is given: a second ReservoirMiddleware further
# in (added twice) passes it straight through instead of enriching and storing again.
HANDLED = "reservoir.handled"
MEMORY_HEADER = b"x-reservoir-memory"
SHUTDOWN_WRITE_SECONDS = 10.0


class ReservoirMiddleware:
    """Long-term memory for the chat completions of the wrapped ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: ReservoirSettings | None = None,
        reservoir: Reservoir | None = None,
        plugins: Sequence[object] = (),
    ) -> None:
        self.app = app
        self.reservoir = reservoir if reservoir is not None else Reservoir(settings, plugins)
        self.settings = settings or self.reservoir.settings
        # a table on either side requires a grant: never fail open by a mismatch
        self.keys_required = bool(
            self.settings.partition_keys or self.reservoir.settings.partition_keys
        )
        self.admin_keys = KeySet([self.settings.admin_key, self.reservoir.settings.admin_key])

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope.get(HANDLED):  # an outer copy of this middleware does the work
            await self.app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self.app({**scope, HANDLED: True}, self._lifespan_receive(receive), send)
            return
        if scope["type"] != "http":
            await self.app(self._for_the_app(scope), receive, send)
            return
        raw_path = scope.get("raw_path") or quote(scope["path"]).encode("latin-1")
        admin_key = self.settings.admin_key
        try:
            admin = match_admin_route(scope["method"], raw_path) if admin_key else None
            route = None
            if admin is None and scope["method"] == "POST":
                route = match_chat_route(raw_path, scope.get("headers") or [], scope["path"])
        except InvalidName as exc:
            await send_error(send, 400, "invalid_request", str(exc))
            return
        if admin is not None and admin_key:
            if not carries_admin_key(scope.get("headers") or [], KeySet([admin_key])):
                await send_error(send, 401, "unauthorized", "the admin key is required")
                return
            await serve_admin(self.reservoir, admin, scope, receive, send)
            return
        if route is None:
            await self.app(self._for_the_app(scope), receive, send)
            return
        refusal = await check_access(  # on the headers as sent: X-Reservoir-Key
            self.reservoir.hooks,
            Scope(route.partition, route.instance),
            scope,
            required=self.keys_required,
            timeout=self.settings.memory_timeout_ms / 1000,
        )
        if refusal is not None:  # before the body is read: no memory touched
            await refusal.send(send)
            return
        try:
            memory = self._memory_mode(scope, route.partition)
        except InvalidMemoryMode as exc:  # before the body is read: nothing stored
            await send_error(send, 400, "invalid_request", f"X-Reservoir-Memory: {exc}")
            return
        app_scope = self._for_the_app(scope)
        exchange = ChatExchange(self.app, self.reservoir, self.settings, route, app_scope, memory)
        await exchange.run(receive, send)

    def _for_the_app(self, scope: ASGIScope) -> ASGIScope:
        """The scope without our own headers (partition, instance and keys are read by
        now), marked as handled."""
        if scope["type"] not in ("http", "websocket"):
            return {**scope, HANDLED: True}
        kept = app_headers(scope.get("headers") or [], self.admin_keys)
        return (
            {**scope, HANDLED: True} if kept is None else {**scope, "headers": kept, HANDLED: True}
        )

    def _memory_mode(self, scope: ASGIScope, partition: str) -> MemoryMode:
        """The client's `X-Reservoir-Memory` narrowed by the partition's policy (on
        either side's settings): it can take permissions away, never add them."""
        sent = [
            value.decode("latin-1")
            for name, value in scope.get("headers") or []
            if name.lower() == MEMORY_HEADER
        ]
        return narrow(
            parse_modes(sent),
            policy_mode(self.settings, partition),
            policy_mode(self.reservoir.settings, partition),
        )

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """Pass lifespan events through; warm the model up while the app starts."""
        reservoir = self.reservoir

        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                task = asyncio.ensure_future(reservoir.warm_up())
                task.add_done_callback(_log_warm_up)
            elif message.get("type") == "lifespan.shutdown":
                try:  # what is left stays in the journal
                    await reservoir.settle(timeout=SHUTDOWN_WRITE_SECONDS)
                except Exception as exc:
                    log_failure("storing queued memory at shutdown failed", exc)
                try:
                    await reservoir.close()
                except Exception as exc:
                    log_failure("stopping the memory's Chroma process failed", exc)
            return message

        return wrapped


def _log_warm_up(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log_failure("reservoir warm-up failed", task.exception())  # type: ignore[arg-type]


class PayloadTooLarge(Exception):
    pass


class ChatExchange:
    """One chat request on its way in and its answer on its way out."""

    def __init__(
        self,
        app: ASGIApp,
        reservoir: Reservoir,
        settings: ReservoirSettings,
        route: ChatRoute,
        scope: ASGIScope,
        memory: MemoryMode = "on",
    ) -> None:
        self.app = app
        self.memory = memory
        self.reservoir = reservoir
        self.settings = settings
        self.route = route
        self.scope = scope
        self.disconnected = False
        self.committed = False
        self.status: int | None = None
        self.enrichment: Enrichment | None = None
        self.assembler: StreamAssembler | JsonAssembler | None = None

    async def run(self, receive: Receive, send: Send) -> None:
        try:
            body = await self._read_body(receive)
        except PayloadTooLarge:
            limit = self.settings.max_body_bytes
            await send_error(
                send, 413, "payload_too_large", f"request body exceeds the limit of {limit} bytes"
            )
            return
        if body is None:  # the client went away before sending its request
            return
        payload = await _off_loop(len(body), _parse_json, body)
        if not isinstance(payload, dict):
            await self._forward(body, self._status(), receive, send)
            return
        headers: list[tuple[bytes, bytes]] = []
        try:
            self.enrichment = await asyncio.wait_for(
                self.reservoir.enrich(
                    self.route.partition,
                    self.route.instance,
                    payload,
                    store="with_answer",
                    memory=self.memory,
                ),
                self.settings.memory_timeout_ms / 1000,
            )
        except InvalidChatRequest:
            await self._forward(body, self._status(), receive, send)
            return
        except Exception as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            log_failure("memory unavailable, request forwarded un-enriched", exc)
            if not self.settings.fail_open:
                await send_error(send, 503, "memory_unavailable", f"memory unavailable: {reason}")
                return
            await self._forward(body, self._status(degraded=True), receive, send)
            return
        enrichment = self.enrichment
        self.memory = enrichment.memory_mode
        headers.append((TRACE_HEADER, enrichment.trace_id.encode("ascii")))
        if enrichment.degraded and not self.settings.fail_open:
            self.reservoir.discard(enrichment)
            message = "; ".join(str(f) for f in enrichment.failures)
            await send_error(send, 503, "memory_unavailable", message)
            return
        headers += self._status(degraded=enrichment.degraded)
        if enrichment.too_long is not None:
            model = payload.get("model") if isinstance(payload.get("model"), str) else None
            stream = payload.get("stream") is True
            await send_too_long(send, model, enrichment.too_long.message, stream, headers)
            return
        new_body = body
        if enrichment.changed:
            new_body = await _off_loop(len(body), _dump_json, enrichment.body)
        await self._forward(new_body, headers, receive, send)

    def _status(self, *, degraded: bool = False) -> list[tuple[bytes, bytes]]:
        header = status_header(degraded=degraded, memory=self.memory)
        return [header] if header is not None else []

    async def _read_body(self, receive: Receive) -> bytes | None:
        limit = self.settings.max_body_bytes
        for name, value in self.scope.get("headers") or []:
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
                raise PayloadTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(
        self, body: bytes, extra_headers: list[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> None:
        """Replay the (rewritten) body to the app and tee its answer."""
        scope = dict(self.scope)
        scope["path"] = self.route.path
        scope["raw_path"] = self.route.raw_path
        scope["headers"] = [
            (k, v)
            for k, v in self.scope.get("headers") or []
            if k.lower() not in (b"content-length", b"transfer-encoding")
        ] + [(b"content-length", str(len(body)).encode("ascii"))]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
            return message

        async def tee(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self._on_start(message, extra_headers)
                await send(message)
                return
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last:  # journalled before the client has it all: a crash loses nothing
                self._on_body(message)
            try:
                await send(message)
            except BaseException:
                self.disconnected = True
                raise
            if message["type"] == "http.response.body" and not last:
                self._on_body(message)

        try:
            await self.app(scope, replay, tee)
        finally:
            self._commit(complete=False)

    def _on_start(self, message: Message, extra: list[tuple[bytes, bytes]]) -> Message:
        status = self.status = int(message.get("status", 200))
        headers = list(message.get("headers") or [])
        recording = self.enrichment is not None and writes(self.memory)
        if recording and 200 <= status < 300:
            content_type = content_encoding = None
            for name, value in headers:
                lowered = name.lower()
                if lowered == b"content-type":
                    content_type = value.decode("latin-1")
                elif lowered == b"content-encoding":
                    content_encoding = value.decode("latin-1")
            self.assembler = make_assembler(content_type, content_encoding)
        if not extra:
            return message
        return {**message, "headers": headers + extra}

    def _on_body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        if self.assembler is not None and chunk:
            try:
                self.assembler.feed(chunk)
            except Exception as exc:
                log_failure("reading the answer failed; it will not be stored", exc)
                self.assembler = None
        if not message.get("more_body", False):
            self._commit(complete=True)

    def _commit(self, *, complete: bool) -> None:
        """Store the request's messages and the assembled answer, once, after the
        last byte (or when the exchange ends early), in the background.

        A request the app refused or failed (non-2xx, an error event in the
        stream) stores nothing: a client without access writes no memory, and
        a retry of a failed request is not a second copy.
        """
        enrichment = self.enrichment
        if self.committed or enrichment is None:
            return
        self.committed = True
        try:
            answer = self.assembler.finish() if self.assembler is not None else None
            failed = self.status is None or not 200 <= self.status < 300
            if failed or (answer is not None and answer.error is not None):
                self.reservoir.discard(enrichment)
                return
            if answer is not None and answer.is_empty:
                answer = None
            # an answer over a cap, or cut short, is stored as far as it goes, as incomplete
            partial = answer is not None and answer.incomplete
            complete = complete and not self.disconnected and not partial
            self.reservoir.record_answer(enrichment, answer, complete=complete)
        except Exception as exc:
            log_failure("recording the answer failed", exc)


INLINE_JSON_BYTES = 64 * 1024


async def _off_loop(size: int, func: Callable[[Any], Any], arg: Any) -> Any:
    """Small bodies are (de)serialised in place; large ones in a worker thread."""
    if size <= INLINE_JSON_BYTES:
        return func(arg)
    return await anyio.to_thread.run_sync(func, arg)


def _parse_json(body: bytes) -> Any:
    """Lenient: a UTF-8 BOM and surrounding white space are accepted."""
    try:
        return json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _dump_json(payload: Any) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \\ud800-style escapes
        return json.dumps(payload, separators=(",", ":")).encode("ascii")
