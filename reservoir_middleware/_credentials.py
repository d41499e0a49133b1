"""Keys given by clients: compared in constant time, and kept away from the wrapped app.

Keys are compared on their UTF-8 bytes (a header carries bytes; a key may be
non-ASCII) through SHA-256 digests and `hmac.compare_digest`, against every
configured key: neither the text nor the length of a key shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

OWN_HEADER_PREFIX = b"x-reservoir-"


def digest(key: str | bytes) -> bytes:
    data = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


class KeySet:
    """Configured keys; `given in keys` compares with all of them, without an early exit."""

    def __init__(self, keys: Iterable[str | None]) -> None:
        self._digests = tuple(digest(key) for key in keys if key)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __contains__(self, given: object) -> bool:
        if not isinstance(given, (str, bytes)) or not given:
            return False
        wanted = digest(given)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(wanted, known)
        return found


def header_token(value: bytes) -> bytes:
    """The token of `Bearer TOKEN`, else the whole (stripped) header value."""
    value = value.strip()
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else value


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
