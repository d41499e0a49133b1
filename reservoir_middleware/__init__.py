"""reservoir-middleware: long-term conversational memory for OpenAI-compatible ASGI gateways.

from reservoir_middleware import ReservoirMiddleware
app.add_middleware(ReservoirMiddleware)
"""

from . import hookspecs
from .engine import Enrichment, Reservoir, SearchHit, TooLong
from .hookspecs import hookimpl
from .middleware import ReservoirMiddleware
from .records import MessageRecord, Scope
from .settings import ReservoirSettings

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
