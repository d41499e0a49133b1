"""The HTTP path: the ASGI middleware, its routes, replies, answer recording and admin endpoints.

Two kinds of scope meet here. The ASGI scope (a dict) is typed `ASGIScope`
(`from starlette.types import Scope as ASGIScope`) and named `scope` or `asgi_scope`;
a memory scope is `records.Scope` (partition, instance) and named `memory`.
"""
