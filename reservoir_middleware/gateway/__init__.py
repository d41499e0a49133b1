"""`reservoir serve`: a complete OpenAI-compatible gateway with memory."""

from reservoir_middleware.gateway.app import create_app

__all__ = ["create_app"]
