"""SSEReader: chunking-independence, the WHATWG line rules, the size cap."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from reservoir_middleware.asgi._sse import SSEEvent, SSEReader


def parse(data: bytes, cuts: list[int] | None = None, cap: int = 1 << 22) -> list[SSEEvent]:
    reader = SSEReader(cap)
    events: list[SSEEvent] = []
    last = 0
    for cut in sorted(set(cuts or [])):
        events += reader.feed(data[last:cut])
        last = cut
    events += reader.feed(data[last:])
    return events + reader.close()


def reference(data: bytes) -> list[SSEEvent]:
    """The spec's algorithm over the whole decoded text (plus the final flush)."""
    text = data.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    if lines[-1] == "":
        lines.pop()  # the stream ended on a terminator
    events: list[SSEEvent] = []
    buf: list[str] = []
    etype = ""
    last_id: str | None = None
    for line in [*lines, ""]:
        if line == "":
            if buf:
                events.append(SSEEvent(etype or "message", "\n".join(buf), last_id))
            buf, etype = [], ""
            continue
        if line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            buf.append(value)
        elif name == "event":
            etype = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


TOKENS = [
    b"data",
    b"data:",
    b"data: ",
    b"event:",
    b"event: error",
    b"id:",
    b"id: 7",
    b"retry: 10",
    b":",
    b": ping",
    b" ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"x",
    b"{}",
    b"[DONE]",
    b"\xc3\xa9",
    b"\xe2\x82\xac",
    b"\xf0\x9f\x98\x80",
    b"\xe2\x82",
    b"\xff",
    b"\x00",
    b"\xef\xbb\xbf",
]
streams = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)


@given(streams, st.lists(st.integers(0, 400), max_size=12))
@settings(max_examples=400, deadline=None)
def test_any_bytes_any_chunking_matches_reference(data: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    assert parse(data, cuts) == parse(data) == reference(data)


@given(streams)
@settings(max_examples=100, deadline=None)
def test_byte_by_byte_matches_reference(data: bytes) -> None:
    assert parse(data, list(range(len(data)))) == reference(data)


event_values = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=30
)


@given(
    st.lists(st.tuples(st.sampled_from(["", "error", "ü"]), event_values), min_size=1),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
@settings(max_examples=300, deadline=None)
def test_event_lists_roundtrip(
    items: list[tuple[str, str]], eol: str, pings: bool, trailing: bool, data: st.DataObject
) -> None:
    text = "\ufeff" if pings else ""
    for etype, value in items:
        if pings:
            text += ": ping" + eol
        if etype:
            text += f"event: {etype}{eol}"
        text += "".join(f"data: {part}{eol}" for part in value.split("\n")) + eol
    if not trailing:
        text = text[: -len(eol)]  # no blank line (nor [DONE]) at the end
    raw = text.encode()
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    expected = [SSEEvent(etype or "message", value) for etype, value in items]
    assert parse(raw, cuts) == expected


def test_fields_and_comments() -> None:
    raw = (
        b": keep-alive\n\nretry: 1500\nid: 42\nevent: update\ndata:a\ndata:  b\n"
        b"data\nfoo: bar\n\nid: bad\x00id\ndata: c\n\n"
    )
    reader = SSEReader()
    assert reader.feed(raw) == [
        SSEEvent("update", "a\n b\n", "42"),
        SSEEvent("message", "c", "42"),
    ]
    assert reader.retry == 1500
    assert not reader.overflowed


def test_crlf_split_between_cr_and_lf() -> None:
    reader = SSEReader()
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\n\r") == [SSEEvent("message", "a")]
    assert reader.feed(b"\ndata: b\r\n\r\n") == [SSEEvent("message", "b")]


def test_split_inside_utf8_and_bom() -> None:
    raw = "\ufeffdata: é€😀\n\n".encode()
    reader = SSEReader()
    events = [e for i in range(len(raw)) for e in reader.feed(raw[i : i + 1])]
    assert events == [SSEEvent("message", "é€😀")]


def test_event_without_blank_line_flushed_on_close() -> None:
    reader = SSEReader()
    assert reader.feed(b'data: {"a": 1}\n\ndata: {"b"') == [SSEEvent("message", '{"a": 1}')]
    assert reader.feed(b": 2}") == []
    assert reader.close() == [SSEEvent("message", '{"b": 2}')]
    assert reader.close() == []
    assert reader.feed(b"data: late\n\n") == []


def test_invalid_utf8_never_raises() -> None:
    reader = SSEReader()
    events = reader.feed(b"data: \xff\xfe\xe2\x82\n\n\xc3")
    events += reader.close()
    assert events == [SSEEvent("message", "\ufffd\ufffd\ufffd")]


def test_huge_line_is_cut_at_the_cap_then_recovers() -> None:
    big = b"data: " + b"x" * 5000 + b"\n"
    raw = b"data: first\n\n" + b"data: head\n" + big + b"data: more\n\n" + b"data: next\n\n"
    cut = SSEEvent("message", "head\n" + "x" * (1024 - 4 - 6), None, truncated=True)
    for step in (1, 7, 100, 1024, len(raw)):
        reader = SSEReader(1024)
        events = [e for i in range(0, len(raw), step) for e in reader.feed(raw[i : i + step])]
        events += reader.close()
        assert events == [SSEEvent("message", "first"), cut, SSEEvent("message", "next")], step
        assert reader.overflowed and not reader.ended_mid_line


def test_many_data_lines_are_cut_at_the_event_cap() -> None:
    reader = SSEReader(100)
    raw = b"data: 0123456789\n" * 20 + b"\ndata: ok\n\n"
    kept = "\n".join(["0123456789"] * 9 + ["0123"])
    assert reader.feed(raw) == [SSEEvent("message", kept, None, True), SSEEvent("message", "ok")]
    assert reader.overflowed


def test_overflow_before_close_keeps_the_start() -> None:
    reader = SSEReader(64)
    assert reader.feed(b"data: " + b"y" * 100) == [SSEEvent("message", "y" * 58, None, True)]
    assert reader.close() == []
    assert reader.overflowed


def test_a_cut_never_splits_a_character_and_other_long_lines_are_skipped_alone() -> None:
    raw = ("data: " + "é" * 40).encode() + b"\n\n"  # 2 bytes a character
    assert parse(raw, cap=31) == [SSEEvent("message", "é" * 12, None, True)]
    raw = b": " + b"z" * 200 + b"\nevent: " + b"e" * 200 + b"\ndata: kept\n\n"
    for cuts in ([], [5, 100, 203, 250]):
        assert parse(raw, cuts, cap=64) == [SSEEvent("message", "kept")]


def test_a_stream_ending_inside_a_line_is_told() -> None:
    reader = SSEReader()
    reader.feed(b'data: {"a": 1}\n\ndata: {"b"')
    assert reader.close() == [SSEEvent("message", '{"b"')]
    assert reader.ended_mid_line
    reader = SSEReader()
    reader.feed(b'data: {"a": 1}\n')
    assert reader.close() == [SSEEvent("message", '{"a": 1}')]
    assert not reader.ended_mid_line


@given(streams, st.lists(st.integers(0, 400), max_size=12), st.integers(1, 24))
@settings(max_examples=300, deadline=None)
def test_overflow_is_chunking_independent(data: bytes, cuts: list[int], cap: int) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    whole = SSEReader(cap)
    expected = whole.feed(data) + whole.close()
    reader = SSEReader(cap)
    got: list[SSEEvent] = []
    last = 0
    for cut in sorted(set(cuts)):
        got += reader.feed(data[last:cut])
        last = cut
    got += reader.feed(data[last:]) + reader.close()
    assert got == expected
    assert reader.overflowed == whole.overflowed
