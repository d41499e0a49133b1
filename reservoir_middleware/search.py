"""The package's one tokenizer, and keyword search ranked by BM25.

`terms()` is what both BM25 rankings see (this keyword search and the
built-in "lexical" retrieval plugin): lower-cased words without common stop
words, lightly stemmed by `stem()`.

Keyword search: Chroma's `$contains` is a case-sensitive substring filter
without ranking, so it only gathers candidates (the query's unstemmed words in
the usual casings); the ranking is done here.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

from .records import MessageRecord, Scope
from .store import MemoryStore

WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?", re.UNICODE)
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "too",
        "us",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)
CANDIDATE_CAP = 2000


def words(text: str) -> list[str]:
    """Lower-cased words of a text without common stop words, a possessive
    "'s" removed ("Caroline's" -> "caroline"); single letters are left out."""
    out = []
    for raw in WORD.findall(text):
        word = raw.lower().replace("\u2019", "'")
        if word.endswith("'s"):
            word = word[:-2]
        if word not in STOP_WORDS and (len(word) > 1 or word.isdigit()):
            out.append(word)
    return out


def terms(text: str) -> list[str]:
    """The words of a text as BM25 indexes them: `words()`, each `stem()`med."""
    return [stem(w) for w in words(text)]


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A light English suffix stripper, the same for queries and messages.

    In order: a plural -s (-ies -> -y; not after -us, -ss: Harman's S-stemmer),
    then -ing or -ed (-ied -> -y) with a doubled final consonant undone except
    -ll, -ss, -zz, then a final -e. So paints/painted/painting -> paint,
    running -> run, studies/studied/studying -> study, hike/hiked/hiking ->
    hik, boxes/box -> box. Only lower-case ASCII words of four letters or more
    change and a stem keeps at least three; other scripts, numbers and short
    words stay as they are. Irregular forms (ran, children) are not handled.
    """
    if len(word) < 4 or not (word.isascii() and word.isalpha()):
        return word
    if word.endswith("ies") and len(word) > 4 and not word.endswith(("aies", "eies")):
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("us", "ss")):
        word = word[:-1]
    if word.endswith("ied") and len(word) > 4:
        word = word[:-3] + "y"
    else:
        for suffix in ("ing", "ed"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
                    word = word[:-1]
                break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def bm25_rank(
    query_terms: list[str], records: list[MessageRecord], *, k1: float = 1.2, b: float = 0.75
) -> list[tuple[MessageRecord, float]]:
    """BM25 scores of `records` for the query, best first (zero scores left out)."""
    if not records or not query_terms:
        return []
    docs = [Counter(terms(r.text)) for r in records]
    avg = sum(sum(d.values()) for d in docs) / len(docs) or 1.0
    df = Counter(t for d in docs for t in set(d) if t in query_terms)
    scored = []
    for record, doc in zip(records, docs, strict=True):
        length = sum(doc.values())
        score = 0.0
        for term in set(query_terms):
            tf = doc.get(term, 0)
            if not tf:
                continue
            idf = math.log(1 + (len(docs) - df[term] + 0.5) / (df[term] + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg))
        if score > 0:
            scored.append((record, score))
    scored.sort(key=lambda pair: pair[1], reverse=True)
    return scored


def keyword_search(
    store: MemoryStore, scope: Scope, query: str, limit: int
) -> list[tuple[MessageRecord, float]]:
    query_words = words(query) or [w.lower() for w in WORD.findall(query)]
    variants = sorted({v for w in query_words for v in (w, w.capitalize(), w.upper())})
    candidates = store.keyword(scope, variants, CANDIDATE_CAP)
    return bm25_rank([stem(w) for w in query_words], candidates)[:limit]
