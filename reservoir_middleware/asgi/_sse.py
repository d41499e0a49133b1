"""Incremental Server-Sent Events parser for the response recorder.

The middleware forwards every body chunk untouched and hands a copy to the
recorder, so this parser sees the stream cut at arbitrary byte boundaries. It
follows the WHATWG event-stream rules with two deliberate differences, both for
recording rather than for a browser:

* ``close()`` dispatches a final event that was not followed by a blank line
  (the spec discards it), because gateways often end a stream without one.
* One pending line plus the ``data`` buffered for one event is capped; an event
  over the cap is cut there: what fits is dispatched at once, marked
  ``truncated`` (``overflowed`` is set), and the rest of the event is skipped
  up to the next blank line, so one huge line cannot hold unbounded memory.
  Any other line over the cap is skipped on its own.

Lines are split on bytes (CR and LF never occur inside a UTF-8 sequence), and
each line is decoded on its own with ``errors="replace"``; that gives the same
text as decoding the whole stream first, without an incremental decoder.
Each byte is looked at a bounded number of times: an unterminated tail is kept
as parts and joined once, when its line ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from reservoir_middleware.asgi._partialjson import utf8_prefix

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEEvent", "SSEReader"]

DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_CR = 13
_LF = 10


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event; ``id`` is the last event id seen so far (spec);
    ``truncated``: its data is only the start, cut at the size cap."""

    event: str
    data: str
    id: str | None = None
    truncated: bool = False


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class SSEReader:
    """Feed bytes in any chunking, get the events completed by each chunk.

    ``overflowed`` tells that at least one event was cut (or a line skipped)
    for the size cap; ``ended_mid_line`` that the stream ended inside a line;
    ``retry`` holds the last valid ``retry:`` value, ``last_event_id`` the id
    carried by the next event.
    """

    __slots__ = (
        "_closed",
        "_data",
        "_data_len",
        "_discard",
        "_drop_line",
        "_event",
        "_head",
        "_max",
        "_pending",
        "_pending_len",
        "_skip_lf",
        "ended_mid_line",
        "last_event_id",
        "overflowed",
        "retry",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max(1, int(max_event_bytes))
        self.overflowed = False
        self.ended_mid_line = False
        self.retry: int | None = None
        self.last_event_id: str | None = None
        # Unterminated line: its parts (not kept while discarding) and length.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._data: list[str] = []
        self._data_len = 0
        self._event = ""
        # The last chunk ended in CR: an LF starting the next one belongs to it.
        self._skip_lf = False
        # After an event was cut: ignore lines until the next blank line.
        self._discard = False
        # The pending line is over the cap: drop the rest of it.
        self._drop_line = False
        # Start of stream, until we know whether it begins with a BOM.
        self._head: bytes | None = b""
        self._closed = False

    @property
    def max_event_bytes(self) -> int:
        return self._max

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse one more piece of the stream; return the events it completed."""
        if self._closed or not chunk:
            return []
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)  # bytearray / memoryview from a lenient caller
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._head = chunk  # maybe a BOM cut short: wait for more
                return []
            self._head = None
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
                if not chunk:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []
        lines = chunk.splitlines()
        last = chunk[-1]
        if last in (_LF, _CR):
            tail = b""
            self._skip_lf = last == _CR
        else:
            tail = lines.pop()
        out: list[SSEEvent] = []
        if lines:
            if self._pending_len:
                if self._discard or self._drop_line:
                    del lines[0]  # the rest of a line already dropped
                else:
                    self._pending.append(lines[0])
                    lines[0] = b"".join(self._pending)
                    self._pending.clear()
                self._pending_len = 0
                self._drop_line = False
            for line in lines:
                self._line(line, out)
        if tail:
            if not (self._discard or self._drop_line):
                self._pending.append(tail)
                size = self._pending_len + len(tail)
                # over the cap, once its field name is known (a data line is cut, not skipped)
                if size + self._data_len > self._max and size >= len(b"data:"):
                    self._overflow(b"".join(self._pending), out)
                    self._drop_line = True
            self._pending_len += len(tail)
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line and event that had no blank line."""
        if self._closed:
            return []
        out: list[SSEEvent] = []
        if self._head:
            self._line(self._head, out)  # a lone partial BOM: just bytes
        self._head = None
        if self._pending_len and not (self._discard or self._drop_line):
            self.ended_mid_line = True
            self._line(b"".join(self._pending), out)
        if not self._discard:
            self._dispatch(out)
        self._closed = True
        self._pending.clear()
        self._pending_len = 0
        self._data.clear()
        self._data_len = 0
        return out

    def _overflow(self, line: bytes, out: list[SSEEvent]) -> None:
        """A line (or the start of one) that takes the event over the cap: a data
        line is cut there and its event dispatched, marked truncated, the rest of
        the event skipped; any other line is skipped alone."""
        self.overflowed = True
        self._pending.clear()
        if not line.startswith(b"data:"):
            return
        head = 6 if line[5:6] == b" " else 5
        room = max(0, self._max - self._data_len - head)
        self._data.append(utf8_prefix(line[head : head + room]))
        event = SSEEvent(self._event or "message", "\n".join(self._data), self.last_event_id, True)
        out.append(event)
        self._data.clear()
        self._data_len = 0
        self._event = ""
        self._discard = True

    def _dispatch(self, out: list[SSEEvent]) -> None:
        if self._data:
            event = SSEEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
            out.append(event)
            self._data.clear()
            self._data_len = 0
        self._event = ""

    def _line(self, line: bytes, out: list[SSEEvent]) -> None:
        """Apply one complete line (without its terminator) to the state."""
        if self._discard:
            if not line:
                self._discard = False
                self._event = ""
            return
        if not line:
            self._dispatch(out)
            return
        if len(line) + self._data_len > self._max:
            self._overflow(line, out)
            return
        if line.startswith(b"data:"):  # the common case first
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(_text(value))
            self._data_len += len(value)
            return
        colon = line.find(b":")
        if colon == 0:
            return  # comment / keep-alive
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if name == b"data":
            self._data.append(_text(value))
            self._data_len += len(value)
        elif name == b"event":
            self._event = _text(value)
        elif name == b"id":
            if b"\x00" not in value:
                self.last_event_id = _text(value)
        elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
            self.retry = int(value)
        # any other field name is ignored, as the spec says
