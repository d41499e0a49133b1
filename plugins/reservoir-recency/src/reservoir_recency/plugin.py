"""The `recency` plugin: memories fade with age unless they are recalled.

Where it acts: the core fuses the retrievers' semantic candidates by rank,
cuts them (with a memory budget, the default, to `semantic_candidates`; else
to `semantic_context_size`), and hands the plan to truncation, which fills
the budget with the units in `unit.score` order and, over the model's
window, drops the lowest-scored first. This plugin is a `reservoir_truncate`
implementation that runs first (`tryfirst`), re-scores every semantic unit
of the plan in place and returns None, so the next truncation (the
built-in) decides what fits — by the decayed scores.

The score: relevance x freshness weight.

- relevance is on the cosine-similarity scale and keeps the core's own order:
  a unit's similarity, raised to the highest similarity of any unit the core
  ranked below it (a unit the fusion put first because BM25 also found it
  counts as at least as relevant as what it beat); units with no similarity
  at or below them (found by lexical retrievers only, at the end of the
  ranking) get 0 and keep their order at the end. Without any similarity in
  the plan (no dense search), the fused score relative to the best one.
- weight = floor + (1 - floor) * 0.5 ** (age / half_life), where age runs
  from the moment the message was stored or, if later, last recalled. A
  fresh or just-recalled memory weighs 1; one never recalled for a
  half-life weighs (1 + floor) / 2; a very old one, `floor`. So an old,
  never-recalled memory beats a fresh one only when it is at least about
  1 / floor times as similar.

"Recalled" means injected into a request's semantic section. The hook sees
the plan before trimming, so it runs the built-in truncation on a copy of
the re-scored plan to learn which messages get in (exact when the built-in
truncation is the one that decides), and records those messages (hits and
the answers or neighbours injected with them) with the time, in a small
SQLite file next to the data. Recent-window messages are not counted: they
are fresh anyway.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from reservoir_middleware import MessageRecord, Scope, hookimpl
from reservoir_middleware._private import private_dir, private_file
from reservoir_middleware.context import ContextPlan, MemoryUnit, TokenBudget

_builtin_truncate: Callable[[ContextPlan, TokenBudget], ContextPlan] | None
try:  # what the next truncation (the built-in) will keep; see `_predict`
    from reservoir_middleware.builtins.truncation import truncate as _builtin_truncate
except ImportError:  # pragma: no cover - a core without it: recall is not recorded
    _builtin_truncate = None

logger = logging.getLogger("reservoir.recency")

DAY = 86_400.0
DEFAULT_HALF_LIFE_DAYS = 30.0
DEFAULT_FLOOR = 0.7


def _default_data_dir() -> Path:
    from reservoir_middleware import ReservoirSettings

    return Path(ReservoirSettings().data_dir)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw is not None and raw.strip() else default


def freshness(age_s: float, half_life_days: float, floor: float) -> float:
    """The weight of a memory `age_s` seconds after it was stored or recalled."""
    halvings = max(age_s, 0.0) / (half_life_days * DAY)
    return floor + (1.0 - floor) * math.pow(0.5, halvings)


def relevance(units: Sequence[MemoryUnit]) -> list[float]:
    """Each unit's relevance on the similarity scale, `units` best first (the
    core's fused order); see the module docstring."""
    out: list[float] = [0.0] * len(units)
    best_below: float | None = None
    for index in range(len(units) - 1, -1, -1):
        similarity = units[index].similarity
        if similarity is not None:
            best_below = similarity if best_below is None else max(best_below, similarity)
        out[index] = best_below if best_below is not None else 0.0
    if best_below is None:  # no dense similarity anywhere: the fused scores, relative
        top = max((u.score for u in units), default=0.0)
        return [u.score / top if top > 0 else 0.0 for u in units]
    return out


def _hit(unit: MemoryUnit) -> MessageRecord:
    return next((r for r in unit.records if r.id == unit.hit_id), unit.records[0])


class RecallLog:
    """When each message was last recalled, and how often, in a SQLite file."""

    def __init__(self, path: Callable[[], Path]) -> None:
        self._path = path
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _db(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        path = self._path()
        if not create and not path.exists():
            yield None
            return
        private_dir(path.parent)  # what was recalled, when: private, like the memory
        private_file(path)  # 0600 (tightened if older), and so are SQLite's journal files
        db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS recalls (partition TEXT NOT NULL, instance TEXT NOT"
                " NULL, id TEXT NOT NULL, count INTEGER NOT NULL, last REAL NOT NULL,"
                " PRIMARY KEY (partition, instance, id)) WITHOUT ROWID"
            )
            yield db
        finally:
            db.close()

    def last(self, records: Iterable[MessageRecord]) -> dict[tuple[Scope, str], float]:
        """When each of these messages was last recalled (absent: never)."""
        by_scope: dict[Scope, list[str]] = {}
        for record in records:
            by_scope.setdefault(record.scope, []).append(record.id)
        found: dict[tuple[Scope, str], float] = {}
        with self._lock, self._db(create=False) as db:
            if db is None:
                return found
            for scope, ids in by_scope.items():
                marks = ",".join("?" * len(ids))
                rows = db.execute(
                    f"SELECT id, last FROM recalls WHERE partition = ? AND instance = ?"
                    f" AND id IN ({marks})",
                    (scope.partition, scope.instance, *ids),
                ).fetchall()
                found.update(((scope, str(id_)), float(last)) for id_, last in rows)
        return found

    def count(self, scope: Scope, id_: str) -> int:
        with self._lock, self._db(create=False) as db:
            if db is None:
                return 0
            row = db.execute(
                "SELECT count FROM recalls WHERE partition = ? AND instance = ? AND id = ?",
                (scope.partition, scope.instance, id_),
            ).fetchone()
        return int(row[0]) if row else 0

    def record(self, records: Iterable[MessageRecord], when: float) -> None:
        rows = {(r.partition, r.instance, r.id): None for r in records}
        if not rows:
            return
        with self._lock, self._db(create=True) as db:
            assert db is not None
            with db:
                db.executemany(
                    "INSERT INTO recalls (partition, instance, id, count, last)"
                    " VALUES (?, ?, ?, 1, ?) ON CONFLICT (partition, instance, id)"
                    " DO UPDATE SET count = count + 1, last = max(last, excluded.last)",
                    [(*key, when) for key in rows],
                )

    def forget(self, scope: Scope) -> None:
        with self._lock, self._db(create=False) as db:
            if db is None:
                return
            with db:
                db.execute(
                    "DELETE FROM recalls WHERE partition = ? AND instance = ?",
                    (scope.partition, scope.instance),
                )


class RecencyDecay:
    """Re-scores semantic memory by relevance x freshness before truncation.

    `data_dir` is the reservoir data directory (default: `RSV_DATA_DIR` and
    the config file, as `ReservoirSettings` reads them, resolved on first
    use); the recall log is `<data_dir>/recency/recalls.sqlite3` unless
    `recall_dir` (or `RSV_RECENCY_DIR`) says otherwise. `half_life_days`
    (`RSV_RECENCY_HALF_LIFE_DAYS`, default 30) and `floor`
    (`RSV_RECENCY_FLOOR`, default 0.7) shape the decay; `clock` gives the
    time (seconds since the epoch).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        recall_dir: str | os.PathLike[str] | None = None,
        half_life_days: float | None = None,
        floor: float | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "recency",
    ) -> None:
        self.name = name
        self.half_life_days = (
            half_life_days
            if half_life_days is not None
            else _env_float("RSV_RECENCY_HALF_LIFE_DAYS", DEFAULT_HALF_LIFE_DAYS)
        )
        self.floor = floor if floor is not None else _env_float("RSV_RECENCY_FLOOR", DEFAULT_FLOOR)
        if self.half_life_days <= 0:
            raise ValueError("the recency half-life must be a positive number of days")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError("the recency floor must be between 0 and 1")
        self.clock = clock
        self._data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        explicit = recall_dir if recall_dir is not None else os.environ.get("RSV_RECENCY_DIR")
        self._recall_dir = Path(explicit).expanduser() if explicit else None
        self._lock = threading.Lock()
        self.recalls = RecallLog(self.recall_file)
        self._warned = False

    def recall_file(self) -> Path:
        with self._lock:
            if self._recall_dir is None:
                data_dir = self._data_dir if self._data_dir is not None else _default_data_dir()
                self._recall_dir = data_dir / "recency"
            return self._recall_dir / "recalls.sqlite3"

    def weight(self, record: MessageRecord, recalled: float | None, now: float) -> float:
        since = max(record.timestamp, recalled or 0.0)
        return freshness(now - since, self.half_life_days, self.floor)

    # -- hooks -------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def reservoir_truncate(self, plan: ContextPlan, budget: TokenBudget) -> None:
        if not plan.semantic:
            return None
        now = self.clock()
        ranked = sorted(plan.semantic, key=lambda u: u.score, reverse=True)
        hits = [_hit(u) for u in ranked]
        recalled = self.recalls.last(hits)
        for unit, hit, rel in zip(ranked, hits, relevance(ranked), strict=True):
            unit.score = rel * self.weight(hit, recalled.get((hit.scope, hit.id)), now)
        self.recalls.record(self._predict(plan, budget), now)
        return None  # the next truncation trims the re-scored plan

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        self.recalls.forget(scope)

    # -- what gets injected --------------------------------------------------------------

    def _predict(self, plan: ContextPlan, budget: TokenBudget) -> list[MessageRecord]:
        """The semantic messages the built-in truncation keeps of this plan."""
        if _builtin_truncate is None:
            self._warn("the core has no built-in truncation function to ask")
            return []
        trial = replace(
            plan,
            system=list(plan.system),
            semantic=list(plan.semantic),
            recent=list(plan.recent),
            conversation=list(plan.conversation),
        )
        try:
            kept = _builtin_truncate(trial, budget)
        except Exception as exc:
            self._warn(f"asking the built-in truncation failed: {exc!r}")
            return []
        return [r for unit in kept.semantic for r in unit.records]

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("recency: recalls are not recorded (%s)", why)
