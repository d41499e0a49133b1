"""Reading the memory block the model receives (`<memory>…</memory>` before the
user's text) back into its sections, for assertions on what was injected."""

from __future__ import annotations

import re
from typing import Any

from reservoir_middleware.context import (
    MEMORY_CLOSE,
    MEMORY_OPEN,
    RECENT_NOTE,
    SEMANTIC_NOTE,
    without_memory,
)
from reservoir_middleware.records import content_text

DAY = re.compile(r"^\d{1,2} [A-Z][a-z]{2}( \d{4})?:$")
SPEAKER = re.compile(r"^(\[instance [^\]]*\] )?(user|assistant)( \([^)]*\))?: ")


def block_of(message: dict[str, Any]) -> str:
    """The memory block of a message ("" when it has none)."""
    text = content_text(message.get("content"))
    if not text.startswith(MEMORY_OPEN):
        return ""
    return text[: text.index(MEMORY_CLOSE) + len(MEMORY_CLOSE)]


def own_text(message: dict[str, Any]) -> str:
    """A message's text without its memory block."""
    return without_memory(content_text(message.get("content")))


def sections(message: dict[str, Any]) -> dict[str, list[str]]:
    """The lines of each section ("semantic", "recent") of a message's block:
    `role: text` each (a message's text may span lines), date lines left out."""
    out: dict[str, list[str]] = {"semantic": [], "recent": []}
    current: list[str] | None = None
    for line in block_of(message).split("\n")[1:-1]:
        if line == SEMANTIC_NOTE:
            current = out["semantic"]
        elif line == RECENT_NOTE:
            current = out["recent"]
        elif DAY.match(line) or current is None:
            continue
        elif SPEAKER.match(line) or not current:
            current.append(line)
        else:
            current[-1] += "\n" + line
    return out


def texts(lines: list[str]) -> list[str]:
    """The texts of block lines, without their speaker."""
    return [SPEAKER.sub("", line, count=1) for line in lines]


def memory_of(messages: list[dict[str, Any]]) -> list[str]:
    """Every memory line of a request, in order."""
    return [line for m in messages for s in sections(m).values() for line in s]


def unblocked(message: dict[str, Any]) -> dict[str, Any]:
    """A message as the client sent it: its memory block (text, or first part) removed."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": without_memory(content)}
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0].get("text")
        if isinstance(first, str) and first.startswith(MEMORY_OPEN):
            return {**message, "content": content[1:]}
    return message


def as_messages(lines: list[str]) -> list[dict[str, Any]]:
    """Block lines as the messages they show: role, name, text."""
    out: list[dict[str, Any]] = []
    for line in lines:
        found = SPEAKER.match(line)
        assert found is not None, line
        message: dict[str, Any] = {"role": found.group(2), "content": line[found.end() :]}
        if found.group(3):
            message["name"] = found.group(3).strip()[1:-1]
        out.append(message)
    return out
