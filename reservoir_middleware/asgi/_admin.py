"""Opt-in admin endpoints under each scope's base path (only when `admin_key` is set).

    GET    …/v1/partition/{p}/instance/{i}/memory/search?term=&semantic=&limit=
    GET    …/v1/partition/{p}/instance/{i}/memory/recent?limit=
    GET    …/v1/partition/{p}/instance/{i}/memory/export        (JSON Lines, streamed)
    DELETE …/v1/partition/{p}/instance/{i}/memory
    DELETE …/v1/partition/{p}/instance/{i}/memory/messages/{id}   (one message, by its id)

Every call needs `Authorization: Bearer ADMIN_KEY` (or `X-Reservoir-Admin-Key`).
Without an admin key these paths do not exist here: they reach the wrapped app.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Send
from starlette.types import Scope as ASGIScope

from reservoir_middleware.asgi._replies import send_error
from reservoir_middleware.asgi._routes import decode_name, normalised
from reservoir_middleware.engine import Reservoir
from reservoir_middleware.memory.validation import InvalidName
from reservoir_middleware.records import Scope
from reservoir_middleware.storage.transfer import export_lines

_ADMIN = re.compile(
    r"^(?P<prefix>.*?)/v1/partition/(?P<p>[^/]*)/instance/(?P<i>[^/]*)"
    r"/memory(?P<action>/search|/recent|/export|/messages/(?P<m>[^/]+))?/?$"
)
MAX_LIMIT = 1000


@dataclass(frozen=True)
class AdminRoute:
    memory: Scope
    action: str  # "search", "recent", "export", "delete" or "forget"
    message: str | None = None  # the message to forget


def match_admin_route(method: str, raw_path: bytes) -> AdminRoute | None:
    found = _ADMIN.match(normalised(raw_path).decode("latin-1"))
    if found is None:
        return None
    action = (found["action"] or "").lstrip("/")
    if found["m"] is not None:
        if method != "DELETE":
            return None
        memory = Scope(decode_name("partition", found["p"]), decode_name("instance", found["i"]))
        return AdminRoute(memory, "forget", decode_name("message id", found["m"]))
    if (method, action) not in {
        ("GET", "search"),
        ("GET", "recent"),
        ("GET", "export"),
        ("DELETE", ""),
    }:
        return None
    memory = Scope(decode_name("partition", found["p"]), decode_name("instance", found["i"]))
    return AdminRoute(memory, action or "delete")


def _limit(query: dict[str, list[str]], default: int) -> int:
    text = (query.get("limit") or [str(default)])[0]
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidName(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


async def serve_admin(
    reservoir: Reservoir, route: AdminRoute, scope: ASGIScope, receive: Receive, send: Send
) -> None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    memory = route.memory
    response: Response
    try:
        if route.action == "search":
            term = (query.get("term") or [""])[0]
            if not term.strip():
                raise InvalidName("the query parameter 'term' is required")
            semantic = (query.get("semantic") or ["false"])[0].lower() in ("1", "true", "yes")
            hits = await reservoir.search(
                memory.partition, memory.instance, term, limit=_limit(query, 10), semantic=semantic
            )
            payload = {"results": [{**h.record.to_dict(), "score": h.score} for h in hits]}
            response = JSONResponse(payload)
        elif route.action == "recent":
            records = await reservoir.recent(
                memory.partition, memory.instance, limit=_limit(query, 15)
            )
            response = JSONResponse({"messages": [r.to_dict() for r in records]})
        elif route.action == "export":
            lines = export_lines(reservoir.store, [memory])
            response = StreamingResponse(_encoded(lines), media_type="application/x-ndjson")
        elif route.action == "forget":
            assert route.message is not None
            record = await reservoir.forget(memory.partition, memory.instance, route.message)
            if record is None:
                message = f"no message {route.message!r} in {memory.partition}/{memory.instance}"
                await send_error(send, 404, "not_found", message)
                return
            response = JSONResponse({"forgotten": record.to_dict()})
        else:
            deleted = await reservoir.delete(memory.partition, memory.instance)
            response = JSONResponse({"deleted": deleted})
    except InvalidName as exc:
        await send_error(send, 400, "invalid_request", str(exc))
        return
    except RuntimeError as exc:  # a delete the store could not do (its text stays)
        if route.action not in ("delete", "forget"):
            raise
        await send_error(send, 500, "delete_failed", str(exc))
        return
    await response(scope, receive, send)


async def _encoded(lines: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for line in lines:
        yield line.encode("utf-8")
