"""Keyword search ranked by BM25 over the messages that contain a query term.

Chroma's `$contains` is a case-sensitive substring filter without ranking, so
it only gathers candidates (in the usual casings); the ranking is done here.
"""

from __future__ import annotations

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


def terms(text: str) -> list[str]:
    """Lower-cased words of a text without common stop words."""
    words = [w.lower() for w in WORD.findall(text)]
    return [w for w in words if w not in STOP_WORDS and (len(w) > 1 or w.isdigit())]


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
    query_terms = terms(query) or [w.lower() for w in WORD.findall(query)]
    variants = sorted({v for t in query_terms for v in (t, t.capitalize(), t.upper())})
    candidates = store.keyword(scope, variants, CANDIDATE_CAP)
    return bm25_rank(query_terms, candidates)[:limit]
