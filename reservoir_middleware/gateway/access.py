"""Optional API keys and rate limit of `reservoir serve`, checked before memory is touched."""

from __future__ import annotations

import math
import time
from collections import deque
from urllib.parse import quote

from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from reservoir_middleware._credentials import KeySet, api_key, carries_admin_key
from reservoir_middleware.asgi._admin import match_admin_route
from reservoir_middleware.asgi._replies import send_error
from reservoir_middleware.memory.validation import InvalidName
from reservoir_middleware.settings import ReservoirSettings

OPEN_PATHS = frozenset({"/health"})


class AccessMiddleware:
    """`RSV_API_KEYS`: `Authorization: Bearer KEY` or `x-api-key: KEY`, else 401.
    `rate_limit_per_minute`: per key (or client address), else 429.
    The admin key passes both on the admin endpoints only (they check it again)."""

    def __init__(self, app: ASGIApp, *, settings: ReservoirSettings) -> None:
        self.app = app
        self.keys = KeySet(settings.api_keys)
        self.admin_keys = KeySet([settings.admin_key])
        self.per_minute = settings.rate_limit_per_minute
        self.windows: dict[str, deque[float]] = {}

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.admin_keys and self._admin_request(scope):
            await self.app(scope, receive, send)
            return
        token = api_key(scope.get("headers") or [])
        if self.keys and token not in self.keys:
            await send_error(
                send,
                401,
                "unauthorized",
                "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if self.per_minute:
            client = scope.get("client") or ("unknown", 0)
            retry = self._spend(token.decode("latin-1") if self.keys else str(client[0]))
            if retry:
                await send_error(
                    send,
                    429,
                    "rate_limit_exceeded",
                    f"more than {self.per_minute} requests in a minute",
                    [(b"retry-after", str(retry).encode())],
                )
                return
        await self.app(scope, receive, send)

    def _admin_request(self, scope: ASGIScope) -> bool:
        """An admin endpoint, with the admin key: the only request the admin key lets pass."""
        raw_path = scope.get("raw_path") or quote(scope["path"]).encode("latin-1")
        try:
            route = match_admin_route(scope["method"], raw_path)
        except InvalidName:  # answered 400 by the memory middleware, if the keys let it pass
            return False
        return route is not None and carries_admin_key(scope.get("headers") or [], self.admin_keys)

    def _spend(self, who: str) -> int:
        """0 if the request may go, else the seconds until it may."""
        now = time.monotonic()
        window = self.windows.setdefault(who, deque())
        while window and now - window[0] >= 60:
            window.popleft()
        if len(window) >= self.per_minute:
            return max(1, math.ceil(60 - (now - window[0])))
        window.append(now)
        if len(self.windows) > 10_000:  # forget idle clients
            self.windows = {k: v for k, v in self.windows.items() if v and now - v[-1] < 60}
        return 0
