"""Keys given by clients: read from the headers here, compared in constant time, and kept
away from the wrapped app. The one place that knows how a key travels in a request.

Keys are compared on their UTF-8 bytes (a header carries bytes; a key may be
non-ASCII) through SHA-256 digests and `hmac.compare_digest`, against every
configured key: neither the text nor the length of a key shows in the timing.

Each reader keeps the headers its callers have always accepted:
- `partition_key`: `X-Reservoir-Key`, else `Authorization: Bearer` (the chat requests);
- `carries_admin_key`: `Authorization: Bearer` or `X-Reservoir-Admin-Key` (the admin endpoints);
- `api_key`: `x-api-key`, else `Authorization` (`reservoir serve`'s `RSV_API_KEYS`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Generic, TypeVar

OWN_HEADER_PREFIX = b"x-reservoir-"
KEY_HEADER = b"x-reservoir-key"
ADMIN_KEY_HEADER = b"x-reservoir-admin-key"
API_KEY_HEADER = b"x-api-key"
AUTHORIZATION = b"authorization"

V = TypeVar("V")


def digest(key: str | bytes) -> bytes:
    data = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


class KeyTable(Generic[V]):
    """Configured keys, each with a value. `find` compares the given key with every
    entry, without an early exit: which entry matched, if any, shows in no timing."""

    def __init__(self, entries: Iterable[tuple[str | None, V]]) -> None:
        self._entries = tuple((digest(key), value) for key, value in entries if key)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def find(self, given: object) -> V | None:
        """The value of the entry whose key is `given` (text or UTF-8 bytes), else None."""
        if not isinstance(given, (str, bytes)) or not given:
            return None
        wanted = digest(given)
        found: V | None = None
        for known, value in self._entries:
            if hmac.compare_digest(wanted, known):
                found = value
        return found


class KeySet:
    """Configured keys; `given in keys` compares with all of them, without an early exit."""

    def __init__(self, keys: Iterable[str | None]) -> None:
        self._table = KeyTable((key, True) for key in keys)

    def __bool__(self) -> bool:
        return bool(self._table)

    def __contains__(self, given: object) -> bool:
        return self._table.find(given) is not None


def bearer_token(value: bytes) -> bytes | None:
    """The token of `Bearer TOKEN` (the scheme in any case, then a space; white space
    around the token dropped; b"" for a bare `Bearer`), else None. On the value as
    given: a reader that allows white space before the scheme strips the value first."""
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def header_token(value: bytes) -> bytes:
    """The token of `Bearer TOKEN`, else the whole (stripped) header value."""
    value = value.strip()
    token = bearer_token(value)
    return value if token is None else token


def partition_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """`X-Reservoir-Key`, else the Bearer token of `Authorization`: the first non-blank
    header of each; blank is absent. Text for the plugins: UTF-8, else latin-1."""
    explicit = bearer = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == KEY_HEADER and explicit is None:
            explicit = _text(value.strip()) or None
        elif lowered == AUTHORIZATION and bearer is None:
            token = bearer_token(value.strip())
            if token is not None:
                bearer = _text(token) or None
    return explicit or bearer


def carries_admin_key(headers: Iterable[tuple[bytes, bytes]], admin: KeySet) -> bool:
    """Whether any `Authorization: Bearer` or `X-Reservoir-Admin-Key` header holds an admin
    key. `Bearer` must open the value (no white space before it: HTTP servers strip it)."""
    for name, value in headers:
        lowered = name.lower()
        given = None
        if lowered == AUTHORIZATION:
            given = bearer_token(value)
        elif lowered == ADMIN_KEY_HEADER:
            given = value.strip()
        if given is not None and given in admin:
            return True
    return False


def api_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`x-api-key` as sent, else `Authorization` (its Bearer token, or the whole value):
    the last header of each name; b"" when there is none."""
    last = {name.lower(): value for name, value in headers}
    return last.get(API_KEY_HEADER) or header_token(last.get(AUTHORIZATION, b""))


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def app_headers(
    headers: Iterable[tuple[bytes, bytes]], admin: KeySet
) -> list[tuple[bytes, bytes]] | None:
    """The request headers the wrapped app may see: none of ours (`x-reservoir-*`) and none
    carrying the admin key (so it can never reach a provider). None when nothing is removed."""
    kept: list[tuple[bytes, bytes]] = []
    removed = False
    for name, value in headers:
        if name.lower().startswith(OWN_HEADER_PREFIX) or (admin and header_token(value) in admin):
            removed = True
        else:
            kept.append((name, value))
    return kept if removed else None
