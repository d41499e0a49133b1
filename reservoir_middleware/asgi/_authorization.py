"""Partition access for chat requests: the request's key, the verdict, the refusal.

Runs in the middleware right after the chat route is matched, before the body
is read: a refused request touches no memory and never reaches the wrapped
app. The key is `X-Reservoir-Key`, else the `Authorization: Bearer` token, so
an OpenAI client that only sets `api_key` needs no change. The rules:

- a plugin returns False         -> refused (401 without a key, else 403)
- a plugin fails or times out    -> refused, 503 (fails closed; `fail_open` does not apply)
- `partition_keys` set, and no plugin returned True -> refused (401 / 403)
- otherwise                      -> allowed

Error messages name the partition, never the key.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import Scope as ASGIScope
from starlette.types import Send

from reservoir_middleware._credentials import partition_key
from reservoir_middleware._logs import log_failure
from reservoir_middleware.asgi._replies import send_error
from reservoir_middleware.plugins import Hooks, Verdict
from reservoir_middleware.records import Scope


@dataclass(frozen=True)
class Refusal:
    status: int
    error_type: str
    message: str

    async def send(self, send: Send) -> None:
        extra = [(b"www-authenticate", b"Bearer")] if self.status == 401 else []
        await send_error(send, self.status, self.error_type, self.message, extra)


async def check_access(
    hooks: Hooks, memory: Scope, asgi_scope: ASGIScope, *, required: bool, timeout: float
) -> Refusal | None:
    """None when the request may use `memory`; else how to refuse it."""
    raw = asgi_scope.get("headers") or []
    key = partition_key(raw)
    check = asyncio.ensure_future(hooks.authorize(memory, key, Headers(raw=raw)))
    # not wait_for: it would wait for a blocking plugin's thread to finish
    done, _ = await asyncio.wait({check}, timeout=timeout)
    if not done:
        check.cancel()
        error = TimeoutError(f"no verdict within {timeout:g} s")
        where = f"partition {memory.partition!r}"
        log_failure(f"reservoir_authorize timed out for {where}; the request is denied", error)
        return _unavailable(memory)
    return refusal(check.result(), memory, key, required=required)


def refusal(verdict: Verdict, memory: Scope, key: str | None, *, required: bool) -> Refusal | None:
    if verdict.failure is not None:
        return _unavailable(memory)
    if verdict.denied_by is None and (verdict.granted or not required):
        return None
    partition = memory.partition
    if key is None:
        return Refusal(
            401,
            "unauthorized",
            f"a partition key is required for partition {partition!r} "
            "(X-Reservoir-Key or Authorization: Bearer)",
        )
    return Refusal(403, "forbidden", f"this key does not grant access to partition {partition!r}")


def _unavailable(memory: Scope) -> Refusal:
    return Refusal(
        503,
        "authorization_unavailable",
        f"access to partition {memory.partition!r} could not be checked, so it is denied; "
        "try again later",
    )
