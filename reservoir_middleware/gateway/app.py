"""`reservoir serve`: a complete OpenAI-compatible gateway with memory.

For people who run no gateway: routes each request by model name to OpenAI,
Mistral, Gemini or Ollama (or a provider of the config file), streams the
answer back untouched, and has `ReservoirMiddleware` in front, so it does what
Reservoir did. Upstream errors pass through with their own status and body;
the gateway's own errors use the envelope of the middleware.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from reservoir_middleware._credentials import KeySet, header_token
from reservoir_middleware.asgi.middleware import ReservoirMiddleware
from reservoir_middleware.engine import Reservoir
from reservoir_middleware.gateway.access import AccessMiddleware
from reservoir_middleware.gateway.providers import Provider, Router
from reservoir_middleware.settings import ReservoirSettings

Observer = Callable[[str, dict[str, Any]], Awaitable[None] | None]
PASSED_RESPONSE_HEADERS = ("content-type", "cache-control", "x-request-id", "retry-after")


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class Gateway:
    """The routes of the standalone server; memory is added around them."""

    def __init__(self, settings: ReservoirSettings, observer: Observer | None = None) -> None:
        self.settings = settings
        self.router = Router(settings)
        self.observer = observer
        self.client: httpx.AsyncClient | None = None
        # keys of this gateway: never sent upstream
        self.own_keys = KeySet([*settings.api_keys, *settings.partition_keys, settings.admin_key])

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(self.settings.upstream_timeout_s, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            self.client = client
            yield
            self.client = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:  # served without lifespan events
            timeout = httpx.Timeout(self.settings.upstream_timeout_s, connect=10.0)
            self.client = httpx.AsyncClient(timeout=timeout, trust_env=False)
        return self.client

    async def chat(self, request: Request) -> Response:
        return await self._model_request(request, "chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._model_request(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        return await self._model_request(request, "embeddings")

    async def models(self, request: Request) -> Response:
        client = self._client()
        data: list[dict[str, Any]] = [{"id": "auto", "object": "model", "owned_by": "reservoir"}]
        for provider in self.router.providers.values():
            if provider.api_key_env and not provider.api_key():
                continue
            for model in await self.router.models(client, provider) or []:
                data.append({"id": model, "object": "model", "owned_by": provider.name})
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _model_request(self, request: Request, endpoint: str) -> Response:
        header = request.headers.get("authorization") or ""
        if not header.isascii() and not self._own_key(header):
            return error(
                401,
                "unauthorized",
                "the Authorization header is not ASCII: it is no key of this gateway "
                "and cannot be a provider's key",
            )
        body = await request.body()
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            return error(400, "invalid_request", "the request body is not valid JSON")
        if not isinstance(payload, dict):
            return error(400, "invalid_request", "the request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model.strip():
            return error(400, "invalid_request", "the request has no 'model'")
        client = self._client()
        selected = None
        if model == "auto":
            choice = await self.router.auto(client)
            if choice is None:
                tried = ", ".join(self.router.auto_models)
                return error(
                    503, "backend_unreachable", f"no model for 'auto' is reachable (tried {tried})"
                )
            provider, model = choice
            selected = f"auto (selected: {provider.name}:{model})"
            payload["model"] = model
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        else:
            found = self.router.route(model)
            if found is None:
                return error(
                    400,
                    "unsupported",
                    f"no provider serves the model {model!r}; "
                    f"routes: {self.router.describe_routes()}",
                )
            provider = found
        auth = self._auth(request, provider)
        if provider.name == "openai" and selected is None:
            known = await self.router.models(client, provider, auth)
            if known is not None and model not in known:
                return error(
                    404,
                    "invalid_request",
                    f"the model {model!r} does not exist at openai; valid models: "
                    + ", ".join(sorted(known)),
                )
        if self.observer is not None:
            outcome = self.observer(endpoint, payload)
            if outcome is not None:
                await outcome
        return await self._forward(provider, endpoint, body, auth, selected)

    def _auth(self, request: Request, provider: Provider) -> str | None:
        """The client's own Authorization, unless it is a key of this gateway
        (an API key, a partition key or the admin key: never sent upstream);
        else the provider's key."""
        header = request.headers.get("authorization")
        if header and not self._own_key(header):
            return header
        return provider.auth_header()

    def _own_key(self, header: str) -> bool:
        """Compared on the header's bytes (Starlette decodes them as latin-1) with the
        UTF-8 of the keys: a non-ASCII key is recognised too."""
        return header_token(header.encode("latin-1")) in self.own_keys

    async def _forward(
        self, provider: Provider, endpoint: str, body: bytes, auth: str | None, selected: str | None
    ) -> Response:
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        }
        if auth:
            headers["authorization"] = auth
        client = self._client()
        upstream = client.build_request(
            "POST", f"{provider.base_url}/{endpoint}", content=body, headers=headers
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.TimeoutException:
            return error(504, "backend_timeout", f"{provider.name} did not answer in time")
        except httpx.TransportError as exc:
            return error(
                502,
                "backend_unreachable",
                f"{provider.name} at {provider.base_url} is unreachable: {exc}",
            )
        passed = {k: v for k, v in response.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}
        content_type = response.headers.get("content-type", "")
        if selected is not None and "json" in content_type and response.status_code < 400:
            return await _relabel_json(provider, response, selected, passed)
        chunks = stream_body(response)
        if selected is not None and "event-stream" in content_type:
            chunks = relabel_stream(chunks, selected)
        return StreamingResponse(
            chunks,
            status_code=response.status_code,
            headers=passed,
            background=BackgroundTask(response.aclose),
        )


async def _relabel_json(
    provider: Provider, response: httpx.Response, selected: str, headers: dict[str, str]
) -> Response:
    """A JSON answer under `auto`, with `model` set to the choice; a body that
    cannot be read or is not JSON is the provider's fault: a 502 (504), never a 500."""
    status = response.status_code
    try:
        raw = await response.aread()
    except httpx.TimeoutException:
        return error(504, "backend_timeout", f"{provider.name} did not finish its answer in time")
    except httpx.HTTPError as exc:
        return error(502, "backend_unreachable", f"{provider.name} broke off its answer: {exc}")
    finally:
        await response.aclose()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        what = "an empty body" if not raw.strip() else "a body that is not JSON"
        return error(502, "backend_error", f"{provider.name} answered {status} with {what}")
    if isinstance(data, dict):
        data["model"] = selected
    return JSONResponse(data, status_code=status, headers=headers)


async def stream_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; a broken upstream stream ends with an error event.
    The upstream response is closed however the stream ends (a client gone included)."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        if "event-stream" in response.headers.get("content-type", ""):
            event = {"error": {"type": "backend_unreachable", "message": f"stream broken: {exc}"}}
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
    finally:
        await response.aclose()


async def relabel_stream(chunks: AsyncIterator[bytes], model: str) -> AsyncIterator[bytes]:
    """Set `model` in every SSE data event (for `"model": "auto"`)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield b"".join(_relabel(line, model) + b"\n" for line in lines)
    if pending:
        yield _relabel(pending, model)


def _relabel(line: bytes, model: str) -> bytes:
    if not line.startswith(b"data:") or b'"model"' not in line:
        return line
    try:
        event = json.loads(line[5:])
    except ValueError:
        return line
    if isinstance(event, dict) and "model" in event:
        event["model"] = model
        return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8")
    return line


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    kind = "invalid_request" if status < 500 else "internal_error"
    return error(
        status,
        kind,
        f"{request.method} {request.url.path}: "
        + (exc.detail if isinstance(exc, HTTPException) else "internal error"),
    )


def create_app(
    settings: ReservoirSettings | None = None,
    *,
    reservoir: Reservoir | None = None,
    observer: Observer | None = None,
) -> Starlette:
    """The standalone gateway: access control, then memory, then the routes."""
    settings = settings or ReservoirSettings()
    gateway = Gateway(settings, observer)
    routes = [
        Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
        Route("/chat/completions", gateway.chat, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=gateway.lifespan, exception_handlers={HTTPException: _not_found}
    )
    app.add_middleware(ReservoirMiddleware, settings=settings, reservoir=reservoir)
    app.add_middleware(AccessMiddleware, settings=settings)  # outermost: before memory
    return app
