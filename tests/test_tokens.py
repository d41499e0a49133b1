"""Token counting and model limits (reservoir_middleware.memory.tokens)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from tiktoken_ext import openai_public

from reservoir_middleware.memory import tokens
from reservoir_middleware.memory.tokens import (
    ModelLimits,
    count_message,
    count_messages,
    count_text,
    encoding_name_for_model,
    get_encoding,
)

REPO = Path(__file__).resolve().parents[1]
URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
SAMPLES = [
    "hello world",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "こんにちは世界、元気ですか",
    "def f(x):\n    return x**2\n\n\n  tabs\tand   spaces  ",
    "I'm here, they're there; it's 12345678 o'clock!! 🦊🦊 <|endoftext|>",
    "",
]

# The message list from OpenAI's cookbook "How to count tokens with tiktoken"; the
# cookbook (and the API) report 129 prompt tokens for gpt-3.5-turbo/gpt-4, 124 for gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


def _reference_encoding(name: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """tiktoken's own constructor, fed the vendored file through tiktoken's own cache."""
    data = (tokens.ENCODINGS_DIR / f"{name}.tiktoken").read_bytes()
    key = hashlib.sha1(URL.format(name).encode()).hexdigest()
    (cache_dir / key).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    return tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[name]())


# --- encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_vendored_files_match_tiktoken_hashes(name: str) -> None:
    source = Path(openai_public.__file__).read_text()
    data = (tokens.ENCODINGS_DIR / f"{name}.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == tokens.EXPECTED_SHA256[name]
    assert f'expected_hash="{digest}"' in source


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_encoding_equals_tiktoken_reference(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _reference_encoding(name, tmp_path, monkeypatch)
    enc = get_encoding(name)
    assert enc.name == ref.name == name
    assert enc.n_vocab == ref.n_vocab
    assert enc._pat_str == ref._pat_str
    assert enc._special_tokens == ref._special_tokens
    assert enc._mergeable_ranks == ref._mergeable_ranks
    for text in SAMPLES:
        assert enc.encode_ordinary(text) == ref.encode_ordinary(text)


def test_published_token_ids() -> None:
    # Values from tiktoken's own test-suite / README.
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert get_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert get_encoding("cl100k_base").encode("<|endoftext|>", allowed_special="all") == [100257]
    assert get_encoding("o200k_base").encode("<|endoftext|>", allowed_special="all") == [199999]


def test_encoding_is_cached() -> None:
    assert get_encoding("o200k_base") is get_encoding("o200k_base")
    with pytest.raises(ValueError, match="unknown encoding"):
        get_encoding("r50k_base")


def test_concurrent_first_use_builds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_cache", {})
    builds: list[str] = []
    real_build = tokens._build

    def counting_build(name: str) -> tiktoken.Encoding:
        builds.append(name)
        return real_build(name)

    monkeypatch.setattr(tokens, "_build", counting_build)
    barrier = threading.Barrier(8)
    results: list[tiktoken.Encoding] = []

    def worker() -> None:
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["cl100k_base"]
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_corrupted_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (tokens.ENCODINGS_DIR / "cl100k_base.tiktoken").read_bytes()
    (tmp_path / "cl100k_base.tiktoken").write_bytes(data.replace(b" 100\n", b" 101\n", 1))
    monkeypatch.setattr(tokens, "ENCODINGS_DIR", tmp_path)
    monkeypatch.setattr(tokens, "_cache", {})
    with pytest.raises(RuntimeError, match="sha256"):
        get_encoding("cl100k_base")


def test_counting_works_with_network_blocked(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*a, **k):
            raise OSError("network blocked by test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from reservoir_middleware.memory.tokens import count_text, count_messages
        print(count_text("hello world", "gpt-4o"), count_text("hello world", "gpt-4"),
              count_messages([{"role": "user", "content": "hi"}], "gpt-4o"),
              "litellm" in sys.modules)
        """
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO),
    }
    env.pop("DATA_GYM_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2", "8", "False"]
    assert list(cache.iterdir()) == []  # nothing written to (or read from) tiktoken's cache


# --- counting ----------------------------------------------------------------------------


def test_count_text_known_values() -> None:
    assert count_text("hello world") == 2
    assert count_text("hello world", "gpt-4") == 2
    assert count_text("") == 0


def test_encodings_differ_where_they_should() -> None:
    text = "こんにちは世界、元気ですか"
    assert count_text(text, "gpt-4") == 9
    assert count_text(text, "gpt-4o") == 7
    assert count_text(text, "some-unknown-model") == 7


def test_special_token_text_is_plain_text() -> None:
    assert count_text("<|endoftext|>") == 7
    assert count_text("a <|endofprompt|> b", "gpt-4") > 3


def test_cookbook_message_counts() -> None:
    for model in ("gpt-3.5-turbo", "gpt-3.5-turbo-0613", "gpt-4", "gpt-4-0613"):
        assert count_messages(COOKBOOK_MESSAGES, model) == 129
    for model in ("gpt-4o", "gpt-4o-mini", "openai/gpt-4o"):
        assert count_messages(COOKBOOK_MESSAGES, model) == 124


def test_count_messages_adds_reply_priming() -> None:
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]
    assert count_messages(msgs) == sum(count_message(m) for m in msgs) + 3
    assert count_messages([]) == 3


def test_count_message_rules() -> None:
    enc = get_encoding("o200k_base")

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text))

    assert count_message({"role": "user", "content": "hello world"}) == 3 + n("user") + 2
    named = {"role": "user", "name": "bob", "content": "hello world"}
    assert count_message(named) == 3 + n("user") + n("bob") + 1 + 2
    assert count_message({"role": "assistant", "content": None}) == 3 + n("assistant")
    tool = {"role": "tool", "tool_call_id": "call_abc123", "content": "42"}
    assert count_message(tool) == 3 + n("tool") + n("call_abc123") + n("42")


def test_content_parts() -> None:
    base = count_message({"role": "user", "content": ""})
    parts = [{"type": "text", "text": "hello world"}, {"type": "text", "text": "hello world"}]
    assert count_message({"role": "user", "content": parts}) == base + 4

    def with_part(part: Any) -> int:
        return count_message({"role": "user", "content": [part]}) - base

    url = "data:image/png;base64," + "A" * 5000
    assert with_part({"type": "image_url", "image_url": {"url": url, "detail": "low"}}) == 85
    assert with_part({"type": "image_url", "image_url": {"url": url, "detail": "high"}}) == 765
    assert with_part({"type": "image_url", "image_url": {"url": url}}) == 765
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 9000, "format": "wav"}}
    assert with_part(audio) == tokens.MEDIA_PART_TOKENS
    file_part = {"type": "file", "file": {"file_data": "A" * 9000}}
    assert with_part(file_part) == tokens.MEDIA_PART_TOKENS


def test_tool_calls() -> None:
    enc = get_encoding("o200k_base")
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
        ],
    }
    expected = (
        3 + len(enc.encode_ordinary("assistant")) + tokens.TOOL_CALL_OVERHEAD
        + len(enc.encode_ordinary("get_weather")) + len(enc.encode_ordinary(args))
    )  # fmt: skip
    assert count_message(msg) == expected
    two = dict(msg, tool_calls=msg["tool_calls"] * 2)
    assert count_message(two) == 2 * expected - 3 - len(enc.encode_ordinary("assistant"))


def test_odd_shapes_count_their_json() -> None:
    enc = get_encoding("o200k_base")
    base = count_message({"role": "user", "content": ""})
    odd: Any = [7, None, "hello world", {"weird": True}, ["x"]]
    expected = base + sum(
        len(enc.encode_ordinary(s)) for s in ("7", "hello world", '{"weird": true}', '["x"]')
    )
    assert count_message({"role": "user", "content": odd}) == expected
    assert count_message({"role": "user", "content": 12345}) == base + 2
    assert count_message({"role": "assistant", "content": "", "tool_calls": "junk"}) > base - 1
    assert count_message({"role": "assistant", "content": "", "tool_calls": [1, {"x": 2}]}) > base
    bad: Any = ["not", "a", "dict"]
    assert count_message(bad) == 3 + len(enc.encode_ordinary('["not", "a", "dict"]'))
    loop: dict[str, Any] = {"role": "user"}
    loop["self"] = loop
    assert count_message(loop) > 3
    assert count_message({"role": "user", "content": [{"type": "image_url", "image_url": "u"}]})


# --- model -> encoding -------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["gpt-4", "gpt-4-0613", "gpt-4-turbo", "gpt-4-32k", "gpt-4-1106-preview", "gpt-3.5-turbo",
     "gpt-3.5-turbo-0125", "gpt-35-turbo", "text-embedding-ada-002", "text-embedding-3-small",
     "openai/gpt-4", "azure/gpt-3.5-turbo", "GPT-4", "ft:gpt-3.5-turbo-0125:org::abc"],
)  # fmt: skip
def test_cl100k_models(model: str) -> None:
    assert encoding_name_for_model(model) == "cl100k_base"


@pytest.mark.parametrize(
    "model",
    ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-nano", "gpt-4.5-preview", "gpt-5", "gpt-5-mini",
     "o1", "o1-mini", "o3", "o3-mini", "o4-mini", "chatgpt-4o-latest", "azure/gpt-4o",
     "openrouter/openai/gpt-4.1", "claude-3-5-sonnet", "llama3", None, ""],
)  # fmt: skip
def test_o200k_models(model: str | None) -> None:
    assert encoding_name_for_model(model) == "o200k_base"


# --- limits ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_litellm_cache() -> Any:
    tokens._litellm_lookup.cache_clear()
    yield
    tokens._litellm_lookup.cache_clear()


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4o", 128_000), ("gpt-4o-mini", 128_000), ("gpt-4o-2024-08-06", 128_000),
        ("gpt-4.1", 1_047_576), ("gpt-4.1-mini", 1_047_576), ("gpt-4", 8_192),
        ("gpt-4-0613", 8_192), ("gpt-4-32k", 32_768), ("gpt-4-turbo", 128_000),
        ("gpt-4-turbo-2024-04-09", 128_000), ("gpt-3.5-turbo", 16_385), ("o1", 200_000),
        ("o3-mini", 200_000), ("o4-mini", 200_000), ("gpt-5", 400_000), ("gpt-5-nano", 400_000),
        ("claude-3-5-sonnet-20241022", 200_000), ("claude-sonnet-4-20250514", 200_000),
        ("claude-opus-4-1", 200_000), ("anthropic/claude-3-haiku-20240307", 200_000),
        ("gemini-2.5-pro", 1_048_576), ("gemini/gemini-2.0-flash", 1_048_576),
        ("gemini-1.5-flash", 1_048_576), ("mistral-large-latest", 128_000),
        ("mistral/mistral-small-latest", 32_000), ("llama3", 8_192), ("ollama/llama3:8b", 8_192),
        ("llama3.1:70b", 131_072), ("ollama_chat/llama3.2", 131_072),
        ("meta-llama/Llama-3.1-8B-Instruct", 131_072), ("qwen2.5:7b", 32_768),
        ("azure/gpt-4o", 128_000), ("openai/gpt-4.1-nano", 1_047_576),
    ],
)  # fmt: skip
def test_builtin_windows(model: str, window: int) -> None:
    assert ModelLimits().context_window(model) == window


def test_unknown_model_uses_default() -> None:
    assert ModelLimits().context_window("my-private-model") == 8192
    assert ModelLimits(default_window=4000).context_window("my-private-model") == 4000
    assert ModelLimits().context_window(None) == 8192
    assert ModelLimits().context_window("") == 8192


def test_overrides_exact_and_prefix() -> None:
    limits = ModelLimits(
        {"gpt-4o": 50_000, "llama3*": 20_000, "llama3.1*": 100_000, "my-model": 3_000, "mist": 1}
    )
    assert limits.context_window("gpt-4o") == 50_000
    assert limits.context_window("openai/gpt-4o") == 50_000  # matched after stripping
    assert limits.context_window("gpt-4o-mini") == 128_000  # no "*": not a prefix
    assert limits.context_window("llama3:8b") == 20_000
    assert limits.context_window("llama3.1:70b") == 100_000  # longest prefix wins
    assert limits.context_window("ollama/llama3.2") == 20_000
    assert limits.context_window("my-model") == 3_000
    assert limits.context_window("mistral-large") == 128_000
    assert ModelLimits({"azure/gpt-4o": 9_000}).context_window("azure/gpt-4o") == 9_000
    assert ModelLimits({"azure/gpt-4o": 9_000}).context_window("gpt-4o") == 128_000


def _fake_litellm(monkeypatch: pytest.MonkeyPatch, get_model_info: Any) -> list[str]:
    calls: list[str] = []

    def wrapped(model: str) -> Any:
        calls.append(model)
        return get_model_info(model)

    module = types.ModuleType("litellm")
    module.get_model_info = wrapped  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "litellm", module)
    return calls


def test_litellm_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_litellm(monkeypatch, lambda m: {"max_input_tokens": 77_777})
    limits = ModelLimits({"known*": 5})
    assert limits.context_window("vendor/exotic-model") == 77_777
    assert limits.context_window("vendor/exotic-model") == 77_777
    assert calls == ["vendor/exotic-model"]  # looked up once, with the full name
    assert limits.context_window("gpt-4o") == 128_000  # table before litellm
    assert limits.context_window("known-x") == 5  # overrides before litellm
    assert calls == ["vendor/exotic-model"]


@pytest.mark.parametrize(
    "info", [lambda m: {"max_input_tokens": None}, lambda m: {}, lambda m: 1 / 0,
             lambda m: {"max_input_tokens": True}, lambda m: {"max_input_tokens": -5}],
)  # fmt: skip
def test_litellm_failures_fall_back_to_default(monkeypatch: pytest.MonkeyPatch, info: Any) -> None:
    _fake_litellm(monkeypatch, info)
    assert ModelLimits(default_window=1234).context_window("exotic-model") == 1234


def test_litellm_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # makes `import litellm` fail
    assert ModelLimits().context_window("exotic-model") == 8192


def test_output_reserve() -> None:
    limits = ModelLimits()
    assert limits.output_reserve({"model": "gpt-4o", "max_tokens": 500}) == 500
    assert limits.output_reserve({"max_completion_tokens": 300, "max_tokens": 500}) == 300
    assert limits.output_reserve({"max_output_tokens": 200}) == 200
    assert limits.output_reserve({"model": "gpt-4o"}) == 1024
    for bad in (0, -1, None, "500", True, 2.5):
        assert limits.output_reserve({"model": "gpt-4o", "max_tokens": bad}) == 1024
    # window // 4 caps the default on small windows
    assert ModelLimits({"tiny": 2000}).output_reserve({"model": "tiny"}) == 500
    assert ModelLimits({"tiny": 2000}).output_reserve({}, "tiny") == 500
    assert ModelLimits(default_output_reserve=64).output_reserve({"model": "gpt-4o"}) == 64


def test_input_limit() -> None:
    limits = ModelLimits({"tiny": 2000})
    assert limits.input_limit("gpt-4o", {"max_tokens": 1000}) == 127_000
    assert limits.input_limit("gpt-4", {}) == 8192 - 1024
    assert limits.input_limit("tiny", {}) == 1500
    # a client's reserve is at most half the window: memory still gets the rest
    assert limits.input_limit("tiny", {"max_tokens": 5000}) == 1000
    assert limits.input_limit("gpt-4o", {"max_tokens": 200_000}) == 64_000
    assert limits.input_limit("unknown-model", {}) == 8192 - 1024
    assert limits.input_limit("my-local-model", {"max_tokens": 9000}) == 4096


def test_refusal_limit() -> None:
    """The "too long" answer: never for an unknown window, never for a large max_tokens."""
    limits = ModelLimits({"tiny": 2000})
    assert limits.refusal_limit("my-local-model", {"max_tokens": 9000}) is None
    assert limits.refusal_limit(None, {}) is None
    assert limits.refusal_limit("tiny", {}) == 1500
    assert limits.refusal_limit("tiny", {"max_tokens": 5000}) == 1500
    assert limits.refusal_limit("tiny", {"max_tokens": 100}) == 1900
    assert limits.refusal_limit("gpt-4o", {"max_tokens": 200_000}) == 128_000 - 1024
