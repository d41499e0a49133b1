"""The recorder's caps and cut streams, unit by unit: what is kept, and when it is incomplete."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reservoir_middleware.asgi._answer import (
    MAX_ANSWER_CHARS,
    MAX_TOOL_CALLS,
    JsonAssembler,
    StreamAssembler,
)
from reservoir_middleware.asgi._partialjson import loads_prefix
from reservoir_middleware.asgi._replies import completion_chunk
from reservoir_middleware.memory.keywords import terms


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    body = completion_chunk(delta or {}, "m", finish_reason=finish, completion_id="c", created=0)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def run(raw: bytes, max_event_bytes: int | None = None) -> Any:
    asm = (
        StreamAssembler()
        if max_event_bytes is None
        else StreamAssembler(max_event_bytes=max_event_bytes)
    )
    for i in range(0, len(raw), 7):
        asm.feed(raw[i : i + 7])
    return asm.finish()


def test_a_stream_is_complete_only_when_it_says_so() -> None:
    text = chunk({"content": "Hello"})
    assert not run(text + chunk(finish="stop") + b"data: [DONE]\n\n").incomplete
    assert not run(text + chunk(finish="stop")).incomplete  # no [DONE]: finish_reason says
    assert not run(text + b"data: [DONE]\n\n").incomplete  # [DONE] says
    assert run(text).cut  # neither
    cut = chunk({"content": " world"})
    answer = run(text + cut[: cut.index(b"orld")])  # ends inside an event
    assert answer.cut and answer.content == "Hello w"
    answer = run(text + chunk(finish="stop") + cut[:-3])  # finished, then cut mid-event
    assert answer.cut


def test_tool_call_arguments_cut_off_make_the_answer_incomplete() -> None:
    call = {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}
    start = chunk({"tool_calls": [call]})
    args = chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": [1, 2'}}]})
    end = chunk(finish="tool_calls") + b"data: [DONE]\n\n"
    assert run(start + args + end).cut
    rest = chunk({"tool_calls": [{"index": 0, "function": {"arguments": "]}"}}]})
    answer = run(start + args + rest + end)
    assert not answer.incomplete
    assert answer.tool_calls[0]["function"]["arguments"] == '{"x": [1, 2]}'


def test_tool_calls_are_capped_in_number_and_in_characters() -> None:
    calls = [
        {"index": n, "id": f"id{n}", "type": "function", "function": {"name": "f", "arguments": ""}}
        for n in range(MAX_TOOL_CALLS + 3)
    ]
    answer = run(b"".join(chunk({"tool_calls": [c]}) for c in calls) + chunk(finish="tool_calls"))
    assert len(answer.tool_calls) == MAX_TOOL_CALLS and answer.capped
    # a tool name as long as the whole cap leaves no room for more
    name = "n" * (MAX_ANSWER_CHARS + 10)
    asm = StreamAssembler()
    for n in range(2):
        call = {"index": n, "id": "", "function": {"name": name, "arguments": "{}"}}
        asm.feed(chunk({"tool_calls": [call]}))
    answer = asm.finish()
    assert answer.capped and len(answer.tool_calls) == 1
    assert len(answer.tool_calls[0]["function"]["name"]) == MAX_ANSWER_CHARS


def test_a_json_body_over_its_cap_gives_its_start() -> None:
    completion = {
        "id": "x",
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "é" * 500}, "finish": None}
        ],
    }
    for ensure_ascii in (True, False):
        raw = json.dumps(completion, ensure_ascii=ensure_ascii).encode()
        asm = JsonAssembler(max_bytes=401)
        for i in range(0, len(raw), 50):
            asm.feed(raw[i : i + 50])
        answer = asm.finish()
        assert answer.error is None and answer.capped and answer.overflowed
        assert answer.incomplete and not answer.done
        assert answer.model == "m" and answer.role == "assistant"
        assert 10 < len(answer.content) < 400 and set(answer.content) == {"é"}


def test_an_event_over_its_cap_keeps_its_start_and_nothing_after() -> None:
    raw = chunk({"content": "a" * 5000}) + chunk({"content": "b"}) + chunk(finish="stop")
    answer = run(raw, max_event_bytes=1024)
    assert answer.capped and answer.overflowed and answer.finish_reason == "stop"
    assert 800 < len(answer.content) < 1024 and set(answer.content) == {"a"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values, st.booleans(), st.data())
@settings(max_examples=300, deadline=None)
def test_every_prefix_of_a_json_text_reads_as_json_or_none(
    value: Any, ensure_ascii: bool, data: st.DataObject
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert loads_prefix(text) == value
    cut = data.draw(st.integers(0, len(text)))
    got = loads_prefix(text[:cut])
    # whatever it gives is valid JSON that encodes without lone surrogates
    json.dumps(got, ensure_ascii=False).encode("utf-8")


def test_a_long_unbroken_word_is_indexed_in_linear_time() -> None:
    """An answer of one 200 000-letter word (a capped answer can be 4 Mi of them) is
    split into terms at once; the compound pattern used to backtrack for hours."""
    assert terms("ab12" * 50_000 + " v1.2.3") == ["ab12" * 50_000, "v1", "2", "3", "v1.2.3"]
