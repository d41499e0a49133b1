"""Token counts of texts kept per encoding, so a stored message is tokenised once.

A request fills its memory budget with stored messages, often long answers
(300-800 tokens): tokenising 40 of them costs 5-15 ms, on every request that
brings them back. Counts are kept here per text, bounded; `precount` fills
them when a scope is loaded (`Reservoir.preload`) and when messages are
written, off the request path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from reservoir_middleware.memory.tokens import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    count_message,
    encoding_name_for_model,
    get_encoding,
    loaded_encodings,
)
from reservoir_middleware.records import Scope
from reservoir_middleware.store import MemoryStore

# -- a memo of texts' counts -------------------------------------------------------------

TOKEN_MEMO_MAX = 600_000  # texts whose count is kept per encoding (a loaded scope's, and more)
PRECOUNT_PAGE = 1_000  # texts read from the store at a time
_PLAIN_KEYS = frozenset({"role", "content", "name"})


class _TextCounts:
    """Token counts of texts in one encoding, in two generations: when the
    young one is full it becomes the old one (and the old one is dropped), a
    text found in the old one moves back. Bounded, O(1), no lock: a race
    costs a recount at worst. The texts are mostly the loaded records' own
    strings, so an entry costs a dict slot, not a copy."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.young: dict[str, int] = {}
        self.old: dict[str, int] = {}

    def known(self, text: str) -> bool:
        """Whether the count is kept (moved to the young generation if it is old)."""
        if text in self.young:
            return True
        tokens = self.old.get(text)
        if tokens is not None:
            self.put(text, tokens)
        return tokens is not None

    def get(self, text: str) -> int:
        tokens = self.young.get(text)
        if tokens is None:
            tokens = self.old.get(text)
            if tokens is None:
                tokens = len(get_encoding(self.encoding).encode_ordinary(text))
            self.put(text, tokens)
        return tokens

    def put(self, text: str, tokens: int) -> None:
        young = self.young
        young[text] = tokens
        if len(young) >= TOKEN_MEMO_MAX // 2:
            self.old, self.young = young, {}


_TEXT_COUNTS: dict[str, _TextCounts] = {}


def _text_counts(encoding: str) -> _TextCounts:
    counts = _TEXT_COUNTS.get(encoding)
    if counts is None:
        counts = _TEXT_COUNTS.setdefault(encoding, _TextCounts(encoding))
    return counts


def count_memoised(message: dict[str, Any], model: str | None) -> int:
    """`count_message` with a memory: each text of a plain message (a stored
    one, a note) is tokenised once in the process, however many requests bring
    it back (`precount` does it ahead, when a scope is loaded or written). The
    sum is `count_message`'s: every value is encoded on its own."""
    content, role, name = message.get("content"), message.get("role"), message.get("name")
    # only str values: an object (a list of parts, a name that is a dict) is counted as before
    plain = name is None or isinstance(name, str)
    if not (plain and isinstance(role, str) and isinstance(content, str)) or not (
        message.keys() <= _PLAIN_KEYS
    ):
        return count_message(message, model)
    counts = _text_counts(encoding_name_for_model(model))
    total = TOKENS_PER_MESSAGE + counts.get(role) + counts.get(content)
    if "name" in message:
        total += TOKENS_PER_NAME + (counts.get(name) if isinstance(name, str) else 0)
    return total


def memoised_counter(model: str | None) -> functools.partial[int]:
    """A `count_memoised` for one model: what a `TokenBudget` counts with."""
    return functools.partial(count_memoised, model=model)


def memoised_text_counter(model: str | None) -> Callable[[str], int]:
    """Tokens of a text on its own in a model's encoding, memoised (memory lines)."""
    return _text_counts(encoding_name_for_model(model)).get


def precount(texts: Sequence[str]) -> int:
    """Count these texts now in every loaded encoding (o200k_base after the
    warm-up), so that no request tokenises them; returns how many were new.
    One thread: tiktoken's batch call on two was slower here (a pool per call)."""
    new = 0
    for name in loaded_encodings():
        counts = _text_counts(name)
        encoding = get_encoding(name)
        for text in dict.fromkeys(t for t in texts if not counts.known(t)):
            counts.put(text, len(encoding.encode_ordinary(text)))
            new += 1
    return new


def precount_messages(messages: Sequence[dict[str, Any]]) -> int:
    """`precount` of the contents of messages (records as injected: `to_message()`)."""
    return precount([m["content"] for m in messages if isinstance(m.get("content"), str)])


def precount_scope(store: MemoryStore, scope: Scope) -> int:
    """`precount` of every text of a scope (read page by page): a preloaded
    scope's requests then tokenise only their own messages."""
    new = offset = 0
    while True:
        page = store.documents(scope, offset, PRECOUNT_PAGE, None)
        new += precount([text for _, text in page])
        offset += len(page)
        if len(page) < PRECOUNT_PAGE:
            return new
