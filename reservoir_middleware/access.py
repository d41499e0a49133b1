"""Optional API keys and rate limit of `reservoir serve`, checked before memory is touched."""

from __future__ import annotations

import math
import time
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send

from .replies import send_error
from .settings import ReservoirSettings

OPEN_PATHS = frozenset({"/health"})


def bearer_token(header: str) -> str:
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else header.strip()


class AccessMiddleware:
    """`RSV_API_KEYS`: `Authorization: Bearer KEY` or `x-api-key: KEY`, else 401.
    `rate_limit_per_minute`: per key (or client address), else 429."""

    def __init__(self, app: ASGIApp, *, settings: ReservoirSettings) -> None:
        self.app = app
        self.keys = frozenset(settings.api_keys)
        self.admin_key = settings.admin_key
        self.per_minute = settings.rate_limit_per_minute
        self.windows: dict[str, deque[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        token = headers.get(b"x-api-key") or bearer_token(headers.get(b"authorization", ""))
        admin = headers.get(b"x-reservoir-admin-key") or token
        if self.admin_key and admin == self.admin_key:  # checked again by the admin endpoints
            await self.app(scope, receive, send)
            return
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
            retry = self._spend(token if self.keys else str(client[0]))
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
