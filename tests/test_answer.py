"""StreamAssembler / JsonAssembler / make_assembler on realistic OpenAI bodies."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reservoir_middleware.asgi._answer import (
    Answer,
    JsonAssembler,
    StreamAssembler,
    make_assembler,
)
from reservoir_middleware.asgi._replies import completion_chunk

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0, **extra: Any
) -> bytes:
    body = completion_chunk(
        delta or {},
        "gpt-4o",
        finish_reason=finish,
        completion_id="chatcmpl-1",
        created=1,
        index=index,
    )
    body.update(extra)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage_chunk() -> bytes:
    body = {**BASE, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def tool_stream() -> bytes:
    def tc(index: int, **kw: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **kw}]}

    parts = [
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Let me check."}),
        chunk(tc(0, id="call_a", type="function", function={"name": "weather", "arguments": ""})),
        chunk(tc(0, function={"arguments": '{"city"'})),
        chunk(tc(0, function={"arguments": ': "Paris"}'})),
        chunk(tc(1, id="call_b", type="function", function={"name": "time", "arguments": '{"tz'})),
        chunk(tc(1, function={"arguments": '": "CET"'})),
        chunk(tc(1, function={"arguments": "}"})),
        chunk(finish="tool_calls"),
        usage_chunk(),
        b"data: [DONE]\n\n",
    ]
    return b"".join(parts)


def run_stream(raw: bytes, step: int = 0, encoding: str | None = None) -> Answer:
    asm = StreamAssembler(encoding)
    step = step or len(raw) or 1
    for i in range(0, len(raw), step):
        asm.feed(raw[i : i + step])
    return asm.finish()


def test_tool_call_stream_any_chunking() -> None:
    raw = tool_stream()
    for step in (1, 3, 17, 150, 0):
        answer = run_stream(raw, step)
        assert answer.content == "Let me check."
        assert answer.role == "assistant"
        assert answer.tool_calls == [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "time", "arguments": '{"tz": "CET"}'},
            },
        ]
        assert answer.finish_reason == "tool_calls"
        assert answer.usage == {"prompt_tokens": 9, "completion_tokens": 12}
        assert (answer.model, answer.response_id) == ("gpt-4o", "chatcmpl-1")
        assert answer.choices == 1
        assert answer.done and answer.error is None and not answer.is_empty


@given(st.lists(st.integers(0, 3000), max_size=30))
@settings(max_examples=150, deadline=None)
def test_content_stream_chunking_independent(cuts: list[int]) -> None:
    pieces = ["Héllo", " wörld", " €", "😀", "\n", " end"]
    raw = b"".join(
        [b": ping\r\n\r\n", chunk({"role": "assistant", "content": ""})]
        + [chunk({"content": p}).replace(b"\n", b"\r\n") for p in pieces]
        + [chunk(finish="stop")]
    )  # CRLF line endings, keep-alive comment, and no [DONE]
    asm = StreamAssembler()
    last = 0
    for cut in sorted(c for c in set(cuts) if c <= len(raw)):
        asm.feed(raw[last:cut])
        last = cut
    asm.feed(raw[last:])
    answer = asm.finish()
    assert answer.content == "".join(pieces)
    assert answer.finish_reason == "stop"
    assert not answer.done
    assert asm.finish() is answer


def test_n2_only_index_zero() -> None:
    raw = b"".join(
        [
            chunk({"role": "assistant", "content": ""}, index=0),
            chunk({"role": "assistant", "content": ""}, index=1),
            chunk({"content": "zero"}, index=0),
            chunk({"content": "one"}, index=1),
            chunk(finish="stop", index=1),
            chunk(finish="length", index=0),
            b"data: [DONE]\n\n",
        ]
    )
    answer = run_stream(raw, 5)
    assert (answer.content, answer.finish_reason, answer.choices) == ("zero", "length", 2)


def test_refusal_deltas() -> None:
    raw = b"".join(
        [
            chunk({"role": "assistant", "content": None, "refusal": ""}),
            chunk({"refusal": "I can't"}),
            chunk({"refusal": " help with that."}),
            chunk(finish="stop"),
            b"data: [DONE]",  # no trailing blank line
        ]
    )
    answer = run_stream(raw, 11)
    assert answer.refusal == "I can't help with that."
    assert answer.content == "" and not answer.is_empty and answer.done


def test_litellm_error_in_stream() -> None:
    err = {"message": "rate limited", "type": "rate_limit_error", "code": "429"}
    raw = chunk({"content": "par"}) + b"data: " + json.dumps({"error": err}).encode() + b"\n\n"
    answer = run_stream(raw, 9)
    assert answer.error == err
    assert answer.content == "par"


def test_sse_error_event() -> None:
    answer = run_stream(b'event: error\ndata: {"error": {"message": "boom"}}\n\n')
    assert answer.error == {"message": "boom"}
    assert run_stream(b"event: error\ndata: upstream went away\n\n").error == "upstream went away"


def test_non_json_data_ignored_and_garbage_never_raises() -> None:
    raw = b'data: hello\n\ndata: [1,2]\n\ndata: {"choices": 5}\n\n' + chunk({"content": "ok"})
    raw += b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [7, {"index": "x"}]}}]}\n\n'
    raw += b"\xff\xfe\x00data: \xc3\n\n" + b"data: " + b"[" * 100_000 + b"\n\n"
    answer = run_stream(raw, 64)
    assert answer.content == "ok" and answer.error is None


def test_legacy_function_call_stream() -> None:
    raw = b"".join(
        [
            chunk({"role": "assistant", "function_call": {"name": "lookup", "arguments": ""}}),
            chunk({"function_call": {"arguments": '{"q": '}}),
            chunk({"function_call": {"arguments": '"x"}'}}),
            chunk(finish="function_call"),
        ]
    )
    answer = run_stream(raw, 13)
    assert answer.tool_calls == [
        {"id": "", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    ]
    assert answer.finish_reason == "function_call"


def test_stream_overflow_keeps_the_start_of_the_event() -> None:
    asm = StreamAssembler(max_event_bytes=256)
    asm.feed(chunk({"content": "a" * 1000}) + chunk({"content": "b"}) + chunk(finish="stop"))
    answer = asm.finish()
    # the start of the cut event, nothing after it (the stored text stays a prefix)
    assert 100 < len(answer.content) < 256 and set(answer.content) == {"a"}
    assert answer.overflowed and answer.capped and answer.incomplete
    assert answer.finish_reason == "stop"


COMPLETION = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Bonjour", "refusal": None},
            "finish_reason": "stop",
        },
        {"index": 1, "message": {"role": "assistant", "content": "Salut"}, "finish_reason": "stop"},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def run_json(raw: bytes, step: int = 7, encoding: str | None = None) -> Answer:
    asm = JsonAssembler(encoding)
    for i in range(0, len(raw), step):
        asm.feed(raw[i : i + step])
    return asm.finish()


def test_json_completion() -> None:
    answer = run_json(json.dumps(COMPLETION).encode())
    assert (answer.content, answer.role, answer.finish_reason) == ("Bonjour", "assistant", "stop")
    assert (answer.model, answer.response_id, answer.choices) == ("gpt-4o-mini", "chatcmpl-9", 2)
    assert answer.usage == COMPLETION["usage"]
    assert answer.refusal is None and answer.error is None and answer.tool_calls == []


def test_json_parts_tool_calls_and_function_call() -> None:
    message = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "a"},
            {"type": "image_url"},
            {"type": "text", "text": "b"},
        ],
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"k": 1}}},
        ],
    }
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    answer = run_json(json.dumps(body).encode())
    assert answer.content == "ab"
    assert [c["function"] for c in answer.tool_calls] == [
        {"name": "f", "arguments": "{}"},
        {"name": "g", "arguments": '{"k": 1}'},
    ]
    legacy = {"choices": [{"message": {"function_call": {"name": "h", "arguments": "[]"}}}]}
    answer = run_json(json.dumps(legacy).encode())
    assert answer.tool_calls == [
        {"id": "", "type": "function", "function": {"name": "h", "arguments": "[]"}}
    ]
    refusal = {"choices": [{"message": {"content": None, "refusal": "No."}}]}
    assert run_json(json.dumps(refusal).encode()).refusal == "No."


def test_json_error_and_bad_json() -> None:
    err = {"error": {"message": "bad key", "type": "invalid_request_error"}}
    assert run_json(json.dumps(err).encode()).error == err["error"]
    for raw in (b'{"choices": [', b"", b"\xff\xfe", b"[1]", b"[" * 100_000):
        answer = run_json(raw)
        assert answer.error == "invalid json" and answer.is_empty


def test_json_overflow() -> None:
    asm = JsonAssembler(max_bytes=100)
    asm.feed(json.dumps(COMPLETION).encode())
    answer = asm.finish()
    assert answer.overflowed and answer.is_empty


def test_gzip_json_small_chunks() -> None:
    raw = gzip.compress(json.dumps(COMPLETION).encode())
    assert run_json(raw, 3, "gzip").content == "Bonjour"
    asm = make_assembler("application/json; charset=utf-8", "GZIP")
    assert isinstance(asm, JsonAssembler)
    for i in range(0, len(raw), 5):
        asm.feed(raw[i : i + 5])
    assert asm.finish().content == "Bonjour"


def test_gzip_sse_small_chunks() -> None:
    raw = gzip.compress(tool_stream())
    asm = make_assembler("text/event-stream", "x-gzip")
    assert isinstance(asm, StreamAssembler)
    for i in range(0, len(raw), 4):
        asm.feed(raw[i : i + 4])
    answer = asm.finish()
    assert len(answer.tool_calls) == 2 and answer.done and answer.error is None


def test_deflate_zlib_and_raw() -> None:
    body = json.dumps(COMPLETION).encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = raw_deflate.compress(body) + raw_deflate.flush()
    for data in (zlib.compress(body), raw):
        assert run_json(data, 1, "deflate").content == "Bonjour"
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = raw_deflate.compress(tool_stream()) + raw_deflate.flush()
    for data in (zlib.compress(tool_stream()), raw):
        assert run_stream(data, 2, "deflate").finish_reason == "tool_calls"


def test_gzip_multi_member_and_corrupt() -> None:
    first, second = gzip.compress(chunk({"content": "a"})), gzip.compress(chunk({"content": "b"}))
    assert run_stream(first + second, 3, "gzip").content == "ab"
    asm = StreamAssembler("gzip")
    asm.feed(first)  # a chunk ending exactly at the end of a member
    asm.feed(second + b"\x00\x00trailing garbage")
    asm.feed(b"more garbage")
    assert asm.finish().content == "ab"
    assert asm.finish().error is None
    broken = bytearray(gzip.compress(tool_stream()))
    broken[40:60] = b"\x00" * 20
    answer = run_stream(bytes(broken), 8, "gzip")
    assert answer.error == "invalid compressed body"
    assert run_json(b"not gzip at all", 4, "gzip").error == "invalid compressed body"


def test_gzip_bomb_is_bounded() -> None:
    raw = gzip.compress(b" " * (40 * 1024 * 1024))
    asm = JsonAssembler("gzip", max_bytes=1024 * 1024)
    asm.feed(raw)
    assert asm.finish().overflowed


def test_make_assembler_choices() -> None:
    assert isinstance(make_assembler("text/event-stream; charset=utf-8"), StreamAssembler)
    assert isinstance(make_assembler("application/vnd.api+json"), JsonAssembler)
    assert isinstance(make_assembler("Application/JSON", "identity"), JsonAssembler)
    assert isinstance(make_assembler("application/json", "deflate"), JsonAssembler)
    assert make_assembler(None) is None
    assert make_assembler("text/html") is None
    assert make_assembler("application/json", "br") is None
    assert make_assembler("text/event-stream", "zstd") is None
    assert make_assembler("application/json", "gzip, br") is None


def test_feed_per_chunk_cost_printed() -> None:
    """Not a check: prints the per-chunk cost for a typical content delta."""
    piece = chunk({"content": "The quick brown fox jumps"})
    asm = StreamAssembler()
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        asm.feed(piece)
    per_chunk = (time.perf_counter() - start) / n * 1e6
    print(f"StreamAssembler.feed: {per_chunk:.2f} us per {len(piece)}-byte chunk")
