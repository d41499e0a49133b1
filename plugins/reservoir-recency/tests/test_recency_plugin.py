"""reservoir-recency in a real engine: embedded Chroma, the bundled embedding model.

The memory budget is set so that exactly one of two competing memories fits:
then the order truncation fills it in decides which one the model sees.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from reservoir_recency import RecencyDecay, freshness, relevance

from reservoir_middleware import MessageRecord, Reservoir, ReservoirSettings, Scope
from reservoir_middleware.cli._transfer import import_lines
from reservoir_middleware.context import MEMORY_CLOSE, MEMORY_OPEN, SEMANTIC_NOTE, MemoryUnit
from reservoir_middleware.memory.tokens import count_text
from reservoir_middleware.storage.transfer import record_line

DAY = 86_400.0
QUESTION = "Where do I usually go running?"
# cosine similarity to QUESTION with the bundled model: 0.573 and 0.562
OLD_CLOSE = "These days I run laps around the park near my office."
FRESH_CLOSE = "Lately I have been jogging in the park after work."
# 0.674 and 0.382: the old one is much more similar
OLD_MUCH_CLOSER = "I usually go running along the river in the morning."
FRESH_FAR = "I bought new running shoes last week."


def one_fits(*texts: str) -> int:
    """A memory budget with room for the longest of these messages, not for two."""
    costs = sorted(  # a line of the memory block each
        count_text("user:", "gpt-4o") + count_text(t, "gpt-4o") + 1 for t in texts
    )
    frame = count_text(MEMORY_OPEN, "gpt-4o") + count_text(MEMORY_CLOSE, "gpt-4o") + 3
    note = count_text(SEMANTIC_NOTE, "gpt-4o") + 1
    day = count_text("25 May 2023:", "gpt-4o") + 1  # a date line
    budget = frame + note + day + costs[-1]
    assert frame + note + day + costs[0] + costs[1] > budget
    return budget


def make_engine(data_dir: Path, *plugins: object, **overrides: Any) -> Reservoir:
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "load_entry_points": False,
        "chroma_process": "inline",  # not about the Chroma child, which takes seconds to start
        "recent_context_size": 0,
        "pair_answers": False,
        "synapse_neighbours": 0,
        **overrides,
    }
    return Reservoir(ReservoirSettings(**settings), plugins)


async def remember_at(engine: Reservoir, text: str, when: float) -> None:
    """Store a message with the time it was written (as `reservoir import` does)."""
    record = MessageRecord(uuid.uuid4().hex, "p", "i", "user", text, timestamp=when)
    report = await import_lines(engine, [(1, record_line(record, None))])
    assert report.imported == 1


async def injected(engine: Reservoir, question: str = QUESTION) -> list[str]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}
    result = await engine.enrich("p", "i", body, store=False)
    assert not result.degraded, result.failures
    return [m.text for m in result.semantic.messages]


async def test_an_old_never_recalled_memory_loses_to_a_fresher_slightly_less_similar_one(
    tmp_path: Path,
) -> None:
    data = tmp_path / "memory"
    budget = one_fits(OLD_CLOSE, FRESH_CLOSE)
    plain = make_engine(data, context_token_budget=budget)
    await remember_at(plain, OLD_CLOSE, time.time() - 120 * DAY)
    await remember_at(plain, FRESH_CLOSE, time.time())
    assert await injected(plain) == [OLD_CLOSE]  # without the plugin: the more similar one

    with_decay = make_engine(data, RecencyDecay(data), context_token_budget=budget)
    assert await injected(with_decay) == [FRESH_CLOSE]

    roomy = make_engine(data, RecencyDecay(data))  # the default budget: both fit, both stay
    assert sorted(await injected(roomy)) == sorted([OLD_CLOSE, FRESH_CLOSE])


async def test_a_much_more_similar_old_memory_still_wins(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    budget = one_fits(OLD_MUCH_CLOSER, FRESH_FAR)
    engine = make_engine(data, RecencyDecay(data), context_token_budget=budget)
    await remember_at(engine, OLD_MUCH_CLOSER, time.time() - 365 * DAY)
    await remember_at(engine, FRESH_FAR, time.time())
    assert await injected(engine) == [OLD_MUCH_CLOSER]


async def test_a_recalled_memory_does_not_fade_and_recalls_persist(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    budget = one_fits(OLD_CLOSE, FRESH_CLOSE)
    decay = RecencyDecay(data)
    engine = make_engine(data, decay, context_token_budget=budget)
    await remember_at(engine, OLD_CLOSE, time.time() - 120 * DAY)
    assert await injected(engine) == [OLD_CLOSE]  # the only memory: recalled now
    stored = await engine.recent("p", "i")
    assert decay.recalls.count(Scope("p", "i"), stored[0].id) == 1

    await remember_at(engine, FRESH_CLOSE, time.time())
    assert await injected(engine) == [OLD_CLOSE]  # just recalled: as fresh as the new one
    assert decay.recalls.count(Scope("p", "i"), stored[0].id) == 2

    restarted = make_engine(data, RecencyDecay(data), context_token_budget=budget)
    assert await injected(restarted) == [OLD_CLOSE]  # the recall log is on disk
    assert (data / "recency" / "recalls.sqlite3").is_file()

    # Not recalled again for 200 days, it fades like any other old memory.
    in_200_days = time.time() + 200 * DAY
    fresh_then = "Nowadays I go jogging in the park after work most days."  # 0.533
    await remember_at(engine, fresh_then, in_200_days - DAY)
    later = RecencyDecay(data, clock=lambda: in_200_days)
    budget = one_fits(OLD_CLOSE, FRESH_CLOSE, fresh_then)
    assert await injected(make_engine(data, later, context_token_budget=budget)) == [fresh_then]


async def test_delete_forgets_the_recalls_of_the_scope(tmp_path: Path) -> None:
    data = tmp_path / "memory"
    decay = RecencyDecay(data)
    engine = make_engine(data, decay)
    await remember_at(engine, OLD_CLOSE, time.time())
    await engine.add("p", "other", [{"role": "user", "content": OLD_CLOSE}])
    assert await injected(engine) == [OLD_CLOSE]
    other = await engine.enrich(
        "p", "other", {"model": "gpt-4o", "messages": [{"role": "user", "content": QUESTION}]}
    )
    assert [m.text for m in other.semantic.messages] == [OLD_CLOSE]
    mine, theirs = (await engine.recent("p", "i"))[0], (await engine.recent("p", "other"))[0]
    await engine.delete("p", "i")
    assert decay.recalls.count(Scope("p", "i"), mine.id) == 0
    assert decay.recalls.count(Scope("p", "other"), theirs.id) == 1


def test_freshness_has_the_documented_half_life() -> None:
    assert freshness(0, 30, 0.7) == 1.0
    assert freshness(30 * DAY, 30, 0.7) == pytest.approx(0.85)
    assert freshness(60 * DAY, 30, 0.7) == pytest.approx(0.775)
    assert freshness(10_000 * DAY, 30, 0.7) == pytest.approx(0.7)
    assert freshness(-5, 30, 0.7) == 1.0  # a clock behind the message: fresh


def unit(score: float, similarity: float | None) -> MemoryUnit:
    record = MessageRecord(uuid.uuid4().hex, "p", "i", "user", "x")
    return MemoryUnit([record], score, record.id, similarity)


def test_relevance_keeps_the_fused_order_on_the_similarity_scale() -> None:
    # A hit fused first because a lexical retriever found it too (similarity
    # 0.3) counts as relevant as the best dense hit it beat; hits only a
    # lexical retriever found, ranked last, get 0 and keep their place.
    units = [unit(0.032, 0.3), unit(0.016, 0.6), unit(0.015, 0.58), unit(0.014, None)]
    assert relevance(units) == [0.6, 0.6, 0.58, 0.0]
    lexical_only = [unit(4.0, None), unit(2.0, None)]
    assert relevance(lexical_only) == [1.0, 0.5]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RSV_RECENCY_HALF_LIFE_DAYS", "7")
    monkeypatch.setenv("RSV_RECENCY_FLOOR", "0.5")
    monkeypatch.setenv("RSV_DATA_DIR", str(tmp_path / "data"))
    decay = RecencyDecay()
    assert (decay.half_life_days, decay.floor) == (7.0, 0.5)
    assert decay.recall_file() == tmp_path / "data" / "recency" / "recalls.sqlite3"
    with pytest.raises(ValueError, match="floor"):
        RecencyDecay(floor=1.5)


async def test_the_recall_log_is_private_under_the_usual_umask(tmp_path: Path) -> None:
    """What was recalled and when tells about the conversations: 0700 and 0600,
    an older loose log tightened."""
    old = os.umask(0o022)
    try:
        data = tmp_path / "memory"
        engine = make_engine(data, RecencyDecay(data))
        await remember_at(engine, OLD_CLOSE, time.time())
        assert await injected(engine) == [OLD_CLOSE]
        log_dir = data / "recency"
        assert (log_dir / "recalls.sqlite3").is_file()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [log_dir, *log_dir.iterdir()]}
        assert all(mode & 0o077 == 0 for mode in modes.values()), modes

        log_dir.chmod(0o755)  # as an older version left them
        for path in log_dir.iterdir():
            path.chmod(0o644)
        assert await injected(make_engine(data, RecencyDecay(data))) == [OLD_CLOSE]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [log_dir, *log_dir.iterdir()]}
        assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    finally:
        os.umask(old)
