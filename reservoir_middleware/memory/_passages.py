"""Passages: the parts of a long message its own vector cannot see.

The built-in model reads the first 256 word pieces of a text, so most of a
long answer is invisible to the dense search. Such a message also gets
passages: its text cut into pieces of at most `PASSAGE_PIECES` word pieces (the
model's own tokenizer counts them), at a paragraph, line, sentence or word end
where one is near, each starting up to `OVERLAP` pieces before the previous
one ends; each is embedded, and the dense search scores the message by the
best of its vectors. The first piece is left out: the message's own vector
reads it already. The cut depends only on the text: the same text always gives
the same passages (an import, a replay and the write path agree).

Only an embedder that says how much it reads gets passages: one with a
`split_passages(texts) -> list[list[str]]` method (`MiniLMEmbedding`). A remote
model (`openai:`, `ollama:`) may read far more, and gets none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PASSAGE_PIECES = 200  # word pieces per passage (the model reads 254 besides [CLS], [SEP])
OVERLAP = 32  # pieces a passage may repeat of the one before, to start at a boundary
MAX_PASSAGES = 32  # per message: a huge one is seen up to about 5,700 word pieces
MAX_CHARS = 80_000  # of a text, what is tokenized to cut it (more than those pieces hold)

# how good a place to cut the space before a piece is
_INSIDE_WORD, _WORD, _SENTENCE, _LINE, _PARAGRAPH = range(5)
_SENTENCE_ENDS = frozenset(".!?;:…")

# A message with passages has more chances to lie near any query: the best of
# its vectors is biased upward. A passage's similarity counts this much lower.
PASSAGE_DISCOUNT = 0.1


def passages_of(embedder: Any, texts: Sequence[str]) -> list[list[str]]:
    """The passages of each text, for this embedder (none if it states no limit)."""
    split = getattr(embedder, "split_passages", None)
    if not callable(split):
        return [[] for _ in texts]
    found = split(list(texts))
    return [list(p) for p in found]


def spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    pieces: Sequence[str],
    reads: int,
) -> list[tuple[int, int]]:
    """Character spans of the passages of `text`, given its word pieces (their
    character offsets and strings, no special tokens) and how many pieces the
    model reads; none when it reads them all."""
    count = len(offsets)
    if count <= reads:
        return []
    strength = [_INSIDE_WORD] + [_cut(text, offsets, pieces, i) for i in range(1, count)]
    cuts: list[tuple[int, int]] = []  # (first piece, end piece) of each passage
    start = 0
    while count - start > PASSAGE_PIECES:
        end = _best(strength, start + PASSAGE_PIECES // 2, start + PASSAGE_PIECES, latest=True)
        cuts.append((start, end))
        start = _best(strength, max(end - OVERLAP, start + 1), end, latest=False)
    if cuts and count - start < PASSAGE_PIECES // 2:  # a short tail: a full-size last one
        low = count - PASSAGE_PIECES
        start = _best(strength, low, low + OVERLAP, latest=False)
    cuts.append((start, count))
    return [(offsets[a][0], offsets[b - 1][1]) for a, b in cuts[1 : MAX_PASSAGES + 1]]


def _cut(text: str, offsets: Sequence[tuple[int, int]], pieces: Sequence[str], i: int) -> int:
    """How good a place to cut before piece `i` is."""
    gap = text[offsets[i - 1][1] : offsets[i][0]]
    if gap.count("\n") >= 2:
        return _PARAGRAPH
    if "\n" in gap:
        return _LINE
    if gap and pieces[i - 1] in _SENTENCE_ENDS:
        return _SENTENCE
    if gap or not pieces[i].startswith("##"):
        return _WORD
    return _INSIDE_WORD


def _best(strength: Sequence[int], low: int, high: int, *, latest: bool) -> int:
    """The piece in [low, high] before which to cut: the strongest boundary, the
    latest (to end a passage) or the earliest (to start one) among equals."""
    candidates = range(high, low - 1, -1) if latest else range(low, high + 1)
    best = max(candidates, key=lambda i: strength[i] if i < len(strength) else _PARAGRAPH)
    return best
