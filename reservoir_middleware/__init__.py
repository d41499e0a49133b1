"""reservoir-middleware: long-term conversational memory for OpenAI-compatible ASGI gateways.

from reservoir_middleware import ReservoirMiddleware
app.add_middleware(ReservoirMiddleware)
"""

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
