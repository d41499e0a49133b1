"""BM25 over the messages of one scope, each keyed with its neighbours' words.

A turn of a conversation often says little by itself ("Yes, last Saturday,
with the kids!"): its subject is in the turn before or after it. So each
message is indexed under its own terms plus, at `NEIGHBOUR_WEIGHT` of their
counts, the terms of the message before it and of the one after it in the
scope (the key expansion of round-level indexing, without an LLM). The
message stored and injected is unchanged; only what finds it grows. Measured
on LoCoMo (three development conversations, budget 1,000): evidence recall
0.807 without, 0.844 with neighbours at 0.5 (`bench/locomo.py`).

Messages are added in the scope's order; the next message of the last one
indexed extends it in place (its postings are the last of each list, so that
costs one step per term).
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from reservoir_middleware.memory.keywords import terms

K1 = 1.2
B = 0.75
NEIGHBOUR_WEIGHT = 0.5


class Bm25Index:
    """BM25 over the messages of one scope; thread-safe, append-only."""

    def __init__(self, neighbour_weight: float = NEIGHBOUR_WEIGHT) -> None:
        self.neighbour_weight = neighbour_weight
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._known: set[str] = set()
        self._lengths = array("f")
        self._total = 0.0
        self._postings: dict[str, tuple[array[int], array[float]]] = {}
        self._last: Counter[str] | None = None  # the own terms of the last message added

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def last_id(self) -> str | None:
        return self._ids[-1] if self._ids else None

    def add(self, docs: Iterable[tuple[str, str]], *, continues: bool = True) -> int:
        """Index (id, text) pairs not indexed yet, in the scope's order; returns
        how many were new. `continues=False`: the first of them does not follow
        the last message indexed (its neighbours' words are not shared)."""
        prepared = [(id_, Counter(terms(text))) for id_, text in docs]
        weight = self.neighbour_weight
        added = 0
        with self._lock:
            if not continues:
                self._last = None
            for id_, counts in prepared:
                if id_ in self._known:
                    self._last = counts if id_ == self.last_id else None
                    continue
                number = len(self._ids)
                key: dict[str, float] = dict(counts)
                if weight and self._last is not None:
                    self._extend(number - 1, counts, weight)  # the one before gets ours
                    for term, tf in self._last.items():
                        key[term] = key.get(term, 0.0) + tf * weight
                self._ids.append(id_)
                self._known.add(id_)
                length = sum(key.values())
                self._lengths.append(float(length))
                self._total += length
                for term, weighted in key.items():
                    posting = self._postings.get(term)
                    if posting is None:
                        posting = self._postings[term] = (array("i"), array("f"))
                    posting[0].append(number)
                    posting[1].append(float(weighted))
                self._last = counts
                added += 1
        return added

    def _extend(self, number: int, counts: Counter[str], weight: float) -> None:
        """Add `counts` at `weight` to message `number`, the last one indexed."""
        for term, tf in counts.items():
            extra = tf * weight
            posting = self._postings.get(term)
            if posting is None:
                posting = self._postings[term] = (array("i"), array("f"))
            if posting[0] and posting[0][-1] == number:
                posting[1][-1] += extra
            else:
                posting[0].append(number)
                posting[1].append(extra)
            self._lengths[number] += extra
            self._total += extra

    def top(self, query_terms: Sequence[str], limit: int) -> list[tuple[str, float]]:
        """The best `limit` (id, score) with a positive score, best first."""
        with self._lock:
            count = len(self._ids)
            if count == 0 or limit <= 0:
                return []
            average = self._total / count or 1.0
            scores = np.zeros(count, dtype=np.float32)
            for term in dict.fromkeys(query_terms):
                posting = self._postings.get(term)
                if posting is None:
                    continue
                # copies, not views: an array exporting its buffer could not grow
                docs = np.frombuffer(posting[0], dtype=np.int32).copy()
                tfs = np.frombuffer(posting[1], dtype=np.float32).copy()
                lengths = np.frombuffer(self._lengths, dtype=np.float32)[docs]
                idf = math.log(1 + (count - len(docs) + 0.5) / (len(docs) + 0.5))
                norm = K1 * (1 - B + B * lengths / average)
                scores[docs] += idf * tfs * (K1 + 1) / (tfs + norm)
            found = np.flatnonzero(scores)
            if len(found) > limit:
                found = found[np.argpartition(-scores[found], limit - 1)[:limit]]
            best = found[np.argsort(-scores[found], kind="stable")]
            return [(self._ids[i], float(scores[i])) for i in best]
