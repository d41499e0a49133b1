"""reservoir-middleware: long-term conversational memory for OpenAI-compatible ASGI gateways.

from reservoir_middleware import ReservoirMiddleware
app.add_middleware(ReservoirMiddleware)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reservoir_middleware import hookspecs
    from reservoir_middleware.asgi.middleware import ReservoirMiddleware
    from reservoir_middleware.engine import Enrichment, Reservoir, SearchHit, TooLong
    from reservoir_middleware.hookspecs import hookimpl
    from reservoir_middleware.records import MessageRecord, Scope
    from reservoir_middleware.settings import ReservoirSettings

__all__ = [
    "Enrichment",
    "MessageRecord",
    "Reservoir",
    "ReservoirMiddleware",
    "ReservoirSettings",
    "Scope",
    "SearchHit",
    "TooLong",
    "hookimpl",
    "hookspecs",
]
__version__ = "0.1.0"

# Loaded on first use, so that importing one submodule (the Chroma child runs
# `python -m reservoir_middleware.storage._child`) does not load the engine,
# chromadb's client, the web framework and pydantic with it.
_HOMES = {
    "Enrichment": "reservoir_middleware.engine",
    "MessageRecord": "reservoir_middleware.records",
    "Reservoir": "reservoir_middleware.engine",
    "ReservoirMiddleware": "reservoir_middleware.asgi.middleware",
    "ReservoirSettings": "reservoir_middleware.settings",
    "Scope": "reservoir_middleware.records",
    "SearchHit": "reservoir_middleware.engine",
    "TooLong": "reservoir_middleware.engine",
    "hookimpl": "reservoir_middleware.hookspecs",
}


def __getattr__(name: str) -> Any:
    if name == "hookspecs":
        return importlib.import_module("reservoir_middleware.hookspecs")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
