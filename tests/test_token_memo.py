"""Stored messages are tokenised off the request path: when a scope is preloaded
and when they are written, never again by the requests that inject them; the
memoised counts are `count_message`'s, exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import Reservoir, Scope
from reservoir_middleware.memory import _token_memo
from reservoir_middleware.memory._token_memo import count_memoised, precount
from reservoir_middleware.memory.tokens import count_message, get_encoding
from reservoir_middleware.storage.chroma import collection_name
from tests.conftest import make_settings

SOURCE = (
    "the ferry schedule changes in winter so plan around the morning crossing and book a "
    "cabin early because the overnight boats fill up fast; remember the port fee, the "
    "luggage limit, and bring snacks for the long wait"
)
WORDS = SOURCE.split()


def long_answer(rng: random.Random, tag: str) -> str:
    """An assistant answer of about 350 tokens, unique to the test."""
    return f"[{tag}] " + " ".join(rng.choice(WORDS) for _ in range(300))


def conversation(tag: str, pairs: int) -> list[dict[str, Any]]:
    rng = random.Random(tag)
    out: list[dict[str, Any]] = []
    for n in range(pairs):
        out.append({"role": "user", "content": f"[{tag}] question {n} about the ferry"})
        out.append({"role": "assistant", "content": long_answer(rng, tag)})
    return out


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every text o200k_base encodes from now on (a fresh memo of counts)."""
    monkeypatch.setattr(_token_memo, "_TEXT_COUNTS", {})
    encoding = get_encoding("o200k_base")
    seen: list[str] = []
    real = encoding.encode_ordinary

    def spy(text: str) -> list[int]:
        seen.append(text)
        return real(text)

    monkeypatch.setattr(encoding, "encode_ordinary", spy)
    yield seen


def ask(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


async def test_a_preloaded_scope_tokenises_no_stored_message_on_request(
    tmp_path: Path, encoded: list[str]
) -> None:
    settings = make_settings(tmp_path, context_token_budget=2000)
    tag = tmp_path.name
    stored = conversation(tag, 8)
    writer = Reservoir(settings)
    await writer.add("p", "i", stored)
    await writer.close()
    _token_memo._TEXT_COUNTS.clear()  # what the write counted: this is about preload

    memory = Reservoir(settings)
    await memory.preload("p", "i")
    texts = {m["content"] for m in stored}
    assert texts <= set(encoded)  # counted by the preload
    # and the first request's read of the newest messages is done too
    assert collection_name(Scope("p", "i")) in memory.store._recent  # type: ignore[attr-defined]
    encoded.clear()
    result = await memory.enrich("p", "i", ask("when does the ferry leave?"), store=False)
    injected = [m.text for m in [*result.semantic.messages, *result.recent.messages]]
    assert len(injected) >= 3 and set(injected) <= texts
    assert not texts & set(encoded), "a stored message was tokenised on the request"
    await memory.close()


async def test_written_messages_are_counted_when_written(
    tmp_path: Path, encoded: list[str]
) -> None:
    memory = Reservoir(make_settings(tmp_path, context_token_budget=2000))
    tag = tmp_path.name
    stored = conversation(tag, 4)
    await memory.add("p", "i", stored)
    texts = {m["content"] for m in stored}
    assert texts <= set(encoded)
    encoded.clear()
    result = await memory.enrich("p", "i", ask("what about the ferry cabin?"), store=False)
    injected = [m.text for m in [*result.semantic.messages, *result.recent.messages]]
    assert len(injected) >= 3 and set(injected) <= texts
    assert not texts & set(encoded), "a stored message was tokenised on the request"
    await memory.close()


MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "   spaces  and\ttabs\n\nnewlines  "},
    {"role": "user", "content": "emoji 🙂 and 中文 and <|endoftext|> as text"},
    {"role": "user", "content": "", "name": "alice"},
    {"role": "assistant", "content": "with a name of None", "name": None},
    {"role": "system", "content": "x" * 5000},
    {"role": "user", "content": [{"type": "text", "text": "a part"}]},
    {"role": "user", "content": "an odd name", "name": {"first": "bob"}},
    {"role": "tool", "content": "result", "tool_call_id": "call_1"},
]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", None, "my-local-model"])
def test_memoised_counts_are_count_message(
    model: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also across the memo's generations (a tiny bound: texts age out and come back)."""
    monkeypatch.setattr(_token_memo, "_TEXT_COUNTS", {})
    monkeypatch.setattr(_token_memo, "TOKEN_MEMO_MAX", 4)
    get_encoding("cl100k_base")  # precount counts in every loaded encoding
    precount([m["content"] for m in MESSAGES if isinstance(m["content"], str)])
    for _ in range(3):
        for message in MESSAGES:
            assert count_memoised(dict(message), model) == count_message(message, model)
    for counts in _token_memo._TEXT_COUNTS.values():
        assert len(counts.young) < 2 and len(counts.old) < 2 + 1
