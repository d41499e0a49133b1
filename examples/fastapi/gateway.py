"""A FastAPI gateway that forwards /v1/* to an OpenAI-compatible upstream, with memory.

    OPENAI_API_KEY=sk-... python examples/fastapi/gateway.py --port 8000

Clients then use http://127.0.0.1:8000/v1/partition/{partition}/instance/{instance}
as their OpenAI base URL. Memory settings come from RSV_* variables (see README).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from reservoir_middleware import ReservoirMiddleware

UPSTREAM = os.environ.get("UPSTREAM_BASE_URL", "https://api.openai.com/v1").rstrip("/")
HOP_BY_HOP = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        app.state.client = client
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(ReservoirMiddleware)  # the one line that adds memory


@app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def forward(path: str, request: Request) -> StreamingResponse:
    """Pass the request on unchanged and stream the answer back as it arrives."""
    client: httpx.AsyncClient = request.app.state.client
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    if "authorization" not in headers and os.environ.get("OPENAI_API_KEY"):
        headers["authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    upstream = client.build_request(
        request.method,
        f"{UPSTREAM}/{path}",
        params=request.query_params,
        headers=headers,
        content=request.stream(),
    )
    response = await client.send(upstream, stream=True)
    return StreamingResponse(
        response.aiter_raw(),
        status_code=response.status_code,
        headers={k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP},
        background=BackgroundTask(response.aclose),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)
