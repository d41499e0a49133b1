"""The HTTP path: the ASGI middleware, its routes, replies, answer recording and admin endpoints."""
