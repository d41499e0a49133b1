"""The value a JSON text cut short would have had, as far as it goes.

An answer over the recorder's caps (one SSE event over its byte cap, a JSON
body over its own) is kept as a prefix; this closes that prefix (the open
string, the open arrays and objects) so the start of the answer can still be
read and stored, marked incomplete. The text is scanned once, strings by a
regular expression, so a cut prefix of several MiB costs a few passes in C.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["loads_prefix", "utf8_prefix"]

# A closed string; possessive, so a long string is one pass in C. Matched left
# to right it lexes the text: inside a string left open at the end every quote
# is escaped, so no match starts there.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")
MAX_BRACKETS = 100_000  # deeper or wider than any chat completion: not worth completing
# What may follow the backslash of an escape cut at the end of a string: `u`
# and up to 3 hex digits, or a high surrogate whose low half is missing.
_U_TAIL = re.compile(r"u(?:[dD][89abAB][0-9a-fA-F]{2}|[0-9a-fA-F]{0,3})\Z")
_LITERAL_TAIL = re.compile(r"[A-Za-z0-9.+\-]+\Z")


def utf8_prefix(raw: bytes) -> str:
    """`raw` decoded, without a last character cut in the middle of its bytes."""
    end = len(raw)
    start = max(0, end - 3)
    for i in range(end - 1, start - 1, -1):
        byte = raw[i]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        if end - i >= need:
            break
        end = i  # the last character lacks bytes: leave it out
        break
    return raw[:end].decode("utf-8", "replace")


def loads_prefix(text: str) -> Any:
    """The parsed value of `text` completed at its end, or None if that fails.

    A string cut short is closed (a cut escape left out); a dangling key,
    comma or partial literal is dropped; open containers are closed.
    """
    rest = _STRING.sub("0", text)  # brackets inside strings do not count
    quote = rest.find('"')  # the start of a string left open, if any
    open_at = None if quote < 0 else len(text) - (len(rest) - quote)
    brackets = _BRACKETS.findall(rest, 0, len(rest) if quote < 0 else quote)
    if len(brackets) > MAX_BRACKETS:
        return None
    stack: list[str] = []
    for token in brackets:
        if token == "{" or token == "[":
            stack.append("}" if token == "{" else "]")
        elif not stack or stack.pop() != token:
            return None
    closers = "".join(reversed(stack))
    candidates: list[str] = []
    if open_at is not None:
        body = _cut_escape(text)
        candidates += [body + '"' + closers, body + '":null' + closers]
        before = text[:open_at].rstrip()
        candidates += _after_value(before, closers)  # the cut string was a key
    else:
        text = text.rstrip()
        candidates += [text + closers]
        candidates += _after_value(text, closers)
        stem = _LITERAL_TAIL.sub("", text).rstrip()
        if stem != text:
            candidates += _after_value(stem, closers)
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return None


def _cut_escape(text: str) -> str:
    """Without an escape cut in the middle at its end."""
    for _ in range(2):  # `\\ud83d\\ude0`: a cut escape, then a lone high surrogate
        tail = _U_TAIL.search(text[-6:])
        stem = text[: len(text) - len(tail.group())] if tail else text
        backslashes = len(stem) - len(stem.rstrip("\\"))
        if backslashes % 2 == 0:  # an even run is escaped backslashes
            break
        text = stem[:-1]
    return text


def _after_value(text: str, closers: str) -> list[str]:
    """Completions of a prefix that stops between values."""
    text = text.rstrip()
    out = [text + "null" + closers]  # after a colon or an opening bracket's key
    trimmed = text.rstrip(",").rstrip()
    if trimmed.endswith(":"):
        out.append(trimmed + "null" + closers)
        key_end = trimmed[:-1].rstrip()
        out.append(_drop_last_key(key_end) + closers)
    else:
        out.append(trimmed + closers)
        out.append(trimmed + ":null" + closers)  # a key without its colon
    return out


def _drop_last_key(text: str) -> str:
    """Without the last `"key"` (and the comma before it)."""
    if not text.endswith('"'):
        return text
    start = text.rfind('"', 0, len(text) - 1)
    while start > 0 and text[start - 1] == "\\":
        start = text.rfind('"', 0, start - 1)
    return text[:start].rstrip().rstrip(",")
