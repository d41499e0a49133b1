"""Which requests carry memory, and for which (partition, instance).

Matched on the raw path so that a percent-encoded `/` inside a partition name
stays inside it, once escapes of unreserved characters (`%63` for `c`) are
decoded, as the app's router decodes them. A path that routes to a chat
endpoint only once its `%2F` are decoded is refused: the app would answer it
without memory and without the access check. A mount prefix before the route
is kept in the rewritten path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from reservoir_middleware.memory.validation import InvalidName, check_name

DEFAULT = "default"
PARTITION_HEADER = b"x-reservoir-partition"
INSTANCE_HEADER = b"x-reservoir-instance"

_SCOPED = (
    re.compile(
        r"^(?P<prefix>.*?)/v1/partition/(?P<p>[^/]*)/instance/(?P<i>[^/]*)/chat/completions/?$"
    ),
    re.compile(
        r"^(?P<prefix>.*?)/partition/(?P<p>[^/]*)/instance/(?P<i>[^/]*)/v1/chat/completions/?$"
    ),
)
_PLAIN = re.compile(r"^(?P<prefix>.*?)(?P<tail>/v1/chat/completions|/chat/completions)/?$")
_CHAT_END = re.compile(r"/chat/completions/?$")  # `$` also before a final newline, as in Starlette


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalised(raw_path: bytes) -> bytes:
    """The raw path with escapes of unreserved characters decoded (RFC 3986, 6.2.2.2),
    once; `%2F`, `%25` and the rest stay as they are."""
    if b"%" not in raw_path:
        return raw_path
    return _ESCAPE.sub(_unreserved, raw_path)


def _unreserved(found: re.Match[bytes]) -> bytes:
    octet = int(found[1], 16)
    return bytes([octet]) if octet in _UNRESERVED else found[0]


def routes_to_chat(path: str) -> bool:
    """Whether a decoded path (what the app routes on) names a chat endpoint."""
    return _CHAT_END.search(path) is not None


@dataclass(frozen=True)
class ChatRoute:
    partition: str
    instance: str
    raw_path: bytes  # what the wrapped app sees

    @property
    def path(self) -> str:
        return unquote(self.raw_path.decode("latin-1"))


def decode_name(kind: str, segment: str) -> str:
    """A partition or instance name from its percent-encoded path segment."""
    try:
        raw = unquote(segment, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidName(f"{kind} name is not valid UTF-8") from exc
    return check_name(kind, raw)


def match_chat_route(
    raw_path: bytes, headers: Iterable[tuple[bytes, bytes]], routed: str | None = None
) -> ChatRoute | None:
    """The chat route of a POST path, or None when memory does not apply.

    `routed` is the decoded path the app routes on (the ASGI `path`). Raises
    InvalidName for a memory route whose names are refused, and for a path
    that is a chat route only once decoded.
    """
    path = normalised(raw_path).decode("latin-1")
    for pattern in _SCOPED:
        found = pattern.match(path)
        if found:
            rewritten = (found["prefix"] + "/v1/chat/completions").encode("latin-1")
            return ChatRoute(
                decode_name("partition", found["p"]), decode_name("instance", found["i"]), rewritten
            )
    found = _PLAIN.match(path)
    if not found:
        if routed is not None and routes_to_chat(routed):
            raise InvalidName(
                "the path is a chat completions route only once percent-decoded (an encoded "
                "'/' or line break), so memory and access checks could not apply to it; "
                "send it unencoded"
            )
        return None
    partition = instance = DEFAULT
    for name, value in headers:
        lowered = name.lower()
        if lowered == PARTITION_HEADER:
            partition = _header_name("partition", value)
        elif lowered == INSTANCE_HEADER:
            instance = _header_name("instance", value)
    return ChatRoute(partition, instance, raw_path)


def _header_name(kind: str, value: bytes) -> str:
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InvalidName(f"{kind} header is not valid UTF-8") from exc
    return check_name(kind, unquote(text))
