"""How much of the evidence for LongMemEval questions `Reservoir.enrich` injects.

    python bench/longmemeval.py                                # every strategy, all questions
    python bench/longmemeval.py --strategies default@1000 --questions 0100672e,09d032c9
    python bench/longmemeval.py --data-dir ~/.cache/rsv-lme    # keep the filled store, reuse it
    python bench/longmemeval.py --list-strategies

LongMemEval_S ("LongMemEval: Benchmarking Chat Assistants on Long-Term
Interactive Memory", ICLR 2025) is what a gateway sees: a user talking to an
assistant whose answers are often 300-800 tokens, about 500 turns per
question. The development split is read from `../shared/datasets/longmemeval/`
beside the repository (see its README.md), or from `--dataset DIR`.

Each question's haystack is stored in its own scope (partition `lme`,
instance the question id) through the public `Reservoir.add`, one call per
session, sessions oldest first (by `haystack_dates`), each turn with its own
role and its session's date as its time. The content-chained ids are computed
beforehand and checked against what the store holds. The filled store is
shared by every strategy (the stored form does not depend on the settings
compared), and every scope is preloaded (`Reservoir.preload`, as a deployment
would for its busy scopes) before it is measured.

The question is asked as a fresh request `{"model": "gpt-4o", "messages":
[{"role": "user", "content": question}]}` with `enrich(..., store=False)`.
Reported per strategy and per question type: turn recall (mean over
questions of the fraction of its `has_answer` turns whose whole text is in an
injected message), session recall (the fraction of answer sessions of which
some turn was injected), mean injected tokens (both sections, notes not
included) and enrich latency (wall time, in process, one request at a time,
each question asked once). Each question is also asked on the next question's
scope (another user's memory): the mean semantic tokens injected there, next
to those on its own scope, show whether unrelated memory fills the budget.

The strategies are those of `bench/locomo.py` (same keys, same settings), so
the two benchmarks measure the same defaults. RSV_* variables and the config
file are ignored, no entry-point plugins are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import anyio.to_thread
from _harness import markdown_table
from locomo import (
    BY_KEY,
    DEFAULT_BUDGET,
    MODEL,
    Strategy,
    add_common_arguments,
    bench_main,
    build_reservoir,
    candidate_depth,
    foreign_scopes,
    foreign_table,
    mean,
    pick_strategies,
    strategy_table,
    tried_strategies,
)

from reservoir_middleware import Reservoir, ReservoirSettings, Scope
from reservoir_middleware.builtins.lexical import LexicalRetrieval
from reservoir_middleware.memory.keywords import terms
from reservoir_middleware.records import chained_id

ROOT = Path(__file__).resolve().parent.parent
DATASET_DIR = ROOT.parent / "shared" / "datasets" / "longmemeval"
PARTITION = "lme"
TYPES = (
    "single-session-user",
    "single-session-assistant",
    "single-session-preference",
    "multi-session",
    "knowledge-update",
    "temporal-reasoning",
)

# -- the dataset ------------------------------------------------------------------


@dataclass
class Turn:
    role: str
    content: str
    session: str
    has_answer: bool


@dataclass
class Session:
    id: str
    date: datetime
    turns: list[Turn]


@dataclass
class Question:
    id: str
    type: str
    text: str
    date: str
    sessions: list[Session]
    answer_sessions: set[str]

    @property
    def instance(self) -> str:
        return self.id

    @property
    def evidence(self) -> list[Turn]:
        return [t for s in self.sessions for t in s.turns if t.has_answer]

    @property
    def turn_count(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def parse_date(raw: str) -> datetime:
    """'2023/05/20 (Sat) 15:08' -> that minute, UTC."""
    day, _, clock = raw.partition(")")
    stamp = f"{day.split('(')[0].strip()} {clock.strip() or '00:00'}"
    return datetime.strptime(stamp, "%Y/%m/%d %H:%M").replace(tzinfo=timezone.utc)


def load_question(path: Path) -> Question:
    data = json.loads(path.read_text(encoding="utf-8"))
    sessions = []
    for sid, date, raw in zip(
        data["haystack_session_ids"],
        data["haystack_dates"],
        data["haystack_sessions"],
        strict=True,
    ):
        turns = [
            Turn(str(t["role"]), str(t["content"]), str(sid), bool(t.get("has_answer")))
            for t in raw
            if t.get("role") in ("user", "assistant") and str(t.get("content", "")).strip()
        ]
        if turns:
            sessions.append(Session(str(sid), parse_date(str(date)), turns))
    sessions.sort(key=lambda s: s.date)  # stable: same-minute sessions keep their order
    question = Question(
        str(data["question_id"]),
        str(data["question_type"]),
        str(data["question"]),
        str(data.get("question_date", "")),
        sessions,
        {str(s) for s in data.get("answer_session_ids", [])},
    )
    if not question.evidence:
        raise ValueError(f"{path}: no has_answer turn")
    return question


def question_files(dataset: Path, selection: str | None) -> list[Path]:
    if not selection:
        files = sorted(dataset.glob("*.json")) if dataset.is_dir() else []
        if not files:
            raise SystemExit(f"no LongMemEval question (*.json) in {dataset}")
        return files
    files = []
    for item in (s.strip() for s in selection.split(",") if s.strip()):
        path = Path(item)
        if not path.is_file():
            path = dataset / (item if item.endswith(".json") else f"{item}.json")
        if not path.is_file():
            raise SystemExit(f"LongMemEval question not found: {item} (looked in {dataset})")
        files.append(path)
    return files


# -- filling the store -------------------------------------------------------------


def session_ids(scope: Scope, session: Session) -> list[str]:
    """The content-chained ids `add` gives the session's turns (one call per session)."""
    ids: list[str] = []
    prev: str | None = None
    for turn in session.turns:
        prev = chained_id(scope, turn.role, turn.content, None, prev)
        ids.append(prev)
    return ids


@dataclass
class Fill:
    turns: int  # distinct messages (a session repeated in the haystack is stored once)
    written: int
    seconds: float
    reused: bool


async def fill(memory: Reservoir, question: Question) -> Fill:
    scope = Scope(PARTITION, question.instance)
    expected = [i for s in question.sessions for i in session_ids(scope, s)]
    unique = list(dict.fromkeys(expected))
    stored = await anyio.to_thread.run_sync(memory.store.count, scope)
    if stored == len(unique):
        found = await anyio.to_thread.run_sync(memory.store.existing_ids, scope, unique)
        if len(found) == len(unique):
            return Fill(len(unique), 0, 0.0, True)
    if stored:
        await memory.delete(PARTITION, question.instance)
    started = time.perf_counter()
    written = 0
    for session in question.sessions:
        messages = [{"role": t.role, "content": t.content} for t in session.turns]
        new = await memory.add(PARTITION, question.instance, messages, timestamp=session.date)
        written += len(new)
    seconds = time.perf_counter() - started
    stored = await anyio.to_thread.run_sync(memory.store.count, scope)
    found = await anyio.to_thread.run_sync(memory.store.existing_ids, scope, unique)
    if stored != len(unique) or len(found) != len(unique) or written != len(unique):
        raise RuntimeError(
            f"question {question.id}: {len(unique)} distinct turns, {written} written, "
            f"{stored} in the store, {len(found)} of the expected ids"
        )
    return Fill(len(unique), written, seconds, False)


# -- measuring ----------------------------------------------------------------------


@dataclass
class Outcome:
    question: Question
    evidence_found: list[bool]
    sessions_found: int
    semantic_tokens: int
    recent_tokens: int
    semantic_count: int
    recent_count: int
    latency_ms: float
    planned: bool = False  # (diagnostics) every missed turn was among the planned ones
    foreign_semantic_tokens: int | None = None  # asked on another question's scope
    block_tokens: int = 0  # the whole memory block as sent: lines, dates, notes, frame
    missed_ranks: list[tuple[int | None, int | None, bool]] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return sum(self.evidence_found) / len(self.evidence_found)

    @property
    def session_recall(self) -> float:
        return self.sessions_found / max(1, len(self.question.answer_sessions))

    @property
    def tokens(self) -> int:
        return self.semantic_tokens + self.recent_tokens

    @property
    def note_tokens(self) -> int:
        """The block's frame, section notes and date lines."""
        return max(0, self.block_tokens - self.tokens)


async def run_strategy(
    strategy: Strategy, data_dir: Path, questions: list[Question]
) -> list[Outcome]:
    memory, observer = build_reservoir(strategy, data_dir)
    await memory.warm_up()
    for question in questions:  # as a deployment preloads its busy scopes: not measured
        await memory.preload(PARTITION, question.instance)
    outcomes: list[Outcome] = []
    for question in questions:
        scope = Scope(PARTITION, question.instance)
        body = {"model": MODEL, "messages": [{"role": "user", "content": question.text}]}
        observer.last = None
        started = time.perf_counter()
        result = await memory.enrich(PARTITION, question.instance, body, store=False)
        elapsed = (time.perf_counter() - started) * 1000
        if result.failures:
            raise RuntimeError(f"{strategy.label}: plugin failures {result.failures}")
        injected = [*result.semantic.messages, *result.recent.messages]
        texts = [m.text for m in injected]
        found = [any(t.content in text for text in texts) for t in question.evidence]
        where = {}
        for session in question.sessions:
            for turn_id in session_ids(scope, session):
                where.setdefault(turn_id, set()).add(session.id)
        hit_sessions: set[str] = set()
        for m in injected:
            hit_sessions |= where.get(m.id, set())
        planned = (
            {r.text for u in observer.last.semantic for r in u.records}
            if observer.last is not None
            else set()
        )
        outcome = Outcome(
            question,
            found,
            len(hit_sessions & question.answer_sessions),
            result.semantic.tokens,
            result.recent.tokens,
            len(result.semantic.messages),
            len(result.recent.messages),
            elapsed,
            block_tokens=result.memory_tokens,
        )
        outcome.missed_ranks = [
            (None, None, t.content in planned)
            for t, ok in zip(question.evidence, found, strict=True)
            if not ok
        ]
        outcomes.append(outcome)
    for outcome, other in zip(
        outcomes, foreign_scopes([q.instance for q in questions]), strict=True
    ):
        if other is not None:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": outcome.question.text}],
            }
            result = await memory.enrich(PARTITION, other, body, store=False)
            outcome.foreign_semantic_tokens = result.semantic.tokens
    await memory.close()
    return outcomes


async def candidate_ranks(data_dir: Path, outcomes: list[Outcome]) -> None:
    """Fill in, for each missed evidence turn, its rank by dense cosine and by BM25
    among all the scope's messages (the diagnostics of the focus strategy)."""
    memory, _ = build_reservoir(BY_KEY["default"], data_dir)
    lexical = LexicalRetrieval(blocking_build=10**9)
    for outcome in outcomes:
        if not outcome.missed_ranks:
            continue
        question = outcome.question
        scope = Scope(PARTITION, question.instance)
        total = await anyio.to_thread.run_sync(memory.store.count, scope)
        hits = await memory.search(PARTITION, question.instance, question.text, limit=total)
        dense = {h.record.text: rank for rank, h in enumerate(hits, 1)}
        index = await anyio.to_thread.run_sync(lexical.index, scope, memory.store)
        assert index is not None
        ranked = index.top(terms(question.text), total)
        by_id = {h.record.id: h.record.text for h in hits}
        bm25 = {by_id.get(i, ""): rank for rank, (i, _) in enumerate(ranked, 1)}
        missed = [
            t for t, ok in zip(question.evidence, outcome.evidence_found, strict=True) if not ok
        ]
        outcome.missed_ranks = [
            (dense.get(t.content), bm25.get(t.content), planned)
            for t, (_, _, planned) in zip(missed, outcome.missed_ranks, strict=True)
        ]
    await memory.close()


# -- report -----------------------------------------------------------------------------


def main_table(results: dict[str, list[Outcome]], strategies: list[Strategy]) -> str:
    columns: list[tuple[str, Callable[[Outcome], float]]] = [
        ("turn recall", lambda o: o.recall),
        ("session recall", lambda o: o.session_recall),
    ]
    return strategy_table(results, strategies, columns, latency="enrich")


def type_table(results: dict[str, list[Outcome]], strategies: list[Strategy]) -> str:
    any_run = next(iter(results.values()))
    present = [t for t in TYPES if any(o.question.type == t for o in any_run)]
    present += sorted({o.question.type for o in any_run} - set(present))
    header = ["strategy"] + [
        f"{t} (n={sum(1 for o in any_run if o.question.type == t)})" for t in present
    ]
    rows = []
    for s in strategies:
        row = [s.label]
        for t in present:
            group = [o.recall for o in results[s.key] if o.question.type == t]
            row.append(f"{mean(group):.3f}" if group else "-")
        rows.append(row)
    return markdown_table(header, rows, "l" + "r" * len(present))


def token_table(results: dict[str, list[Outcome]], strategies: list[Strategy]) -> str:
    rows = []
    for s in strategies:
        out = results[s.key]
        budget = s.settings.get("context_token_budget", DEFAULT_BUDGET)
        left = (
            f"{mean([budget - o.tokens - o.note_tokens for o in out]):.1f}"
            if budget is not None
            else "no budget"
        )
        rows.append(
            [
                s.label,
                f"{mean([o.semantic_count for o in out]):.1f}",
                f"{mean([o.semantic_tokens for o in out]):.1f}",
                f"{mean([o.recent_count for o in out]):.1f}",
                f"{mean([o.recent_tokens for o in out]):.1f}",
                f"{mean([o.note_tokens for o in out]):.1f}",
                left,
            ]
        )
    header = [
        "strategy",
        "semantic msgs",
        "semantic tokens",
        "recent msgs",
        "recent tokens",
        "frame, notes, dates",
        "budget left",
    ]
    return markdown_table(header, rows, "lrrrrrr")


def missed_note(outcomes: list[Outcome], depth: int) -> str:
    total = sum(len(o.evidence_found) for o in outcomes)
    missed = [r for o in outcomes for r in o.missed_ranks]
    cut = sum(1 for _, _, planned in missed if planned)
    not_planned = [(d, b) for d, b, planned in missed if not planned]

    def bucket(rank: int | None) -> str:
        if rank is None:
            return "none"
        return f"1-{depth}" if rank <= depth else ("to 100" if rank <= 100 else "over 100")

    names = [f"1-{depth}", "to 100", "over 100", "none"]
    dense = {n: sum(1 for d, _ in not_planned if bucket(d) == n) for n in names}
    bm25 = {n: sum(1 for _, b in not_planned if bucket(b) == n) for n in names}
    either = sum(1 for d, b in not_planned if (d or 10**9) <= depth or (b or 10**9) <= depth)
    return "\n".join(
        [
            f"- evidence turns: {total}; injected {total - len(missed)}; missed {len(missed)}",
            f"- missed but planned (retrieved, then cut by the token budget): {cut}",
            f"- missed and not planned: {len(not_planned)}; by dense rank "
            + ", ".join(f"{n}: {c}" for n, c in dense.items())
            + "; by BM25 rank "
            + ", ".join(f"{n}: {c}" for n, c in bm25.items())
            + f"; in either top {depth}: {either}",
        ]
    )


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET_DIR, help="LongMemEval directory")
    parser.add_argument("--questions", help="comma separated question ids (file stems) or paths")
    add_common_arguments(parser)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, data_dir: Path) -> str:
    strategies = pick_strategies(args.strategies) + tried_strategies(args.tries)
    questions = [load_question(p) for p in question_files(args.dataset, args.questions)]
    out: list[str] = ["# LongMemEval_S evidence recall through Reservoir.enrich\n"]
    command = shlex.join([sys.executable, *args.command])
    out.append(f"command: `cd {shlex.quote(os.getcwd())} && {command}`\n")
    out.append(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; model {MODEL!r} (o200k_base tokens)\n"
    )
    # Chroma and the embedder in this process, on both threads: the fill is
    # embedding-bound (long answers); the stored form is the same as the child's.
    filler = Reservoir(
        ReservoirSettings(
            data_dir=data_dir, load_entry_points=False, chroma_process="inline", journal=False
        )
    )
    await filler.warm_up()
    fills = []
    for question in questions:
        filled = await fill(filler, question)
        fills.append(filled)
        state = "reused" if filled.reused else f"stored in {filled.seconds:.1f} s"
        print(f"question {question.id}: {filled.turns} turns {state}", file=sys.stderr)
    await filler.settle()
    await filler.close()
    written = sum(f.written for f in fills)
    turns = sum(f.turns for f in fills)
    types = {t: sum(1 for q in questions if q.type == t) for t in {q.type for q in questions}}
    out.append(
        f"dataset: {args.dataset}: {len(questions)} questions ("
        + ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
        + f"), {turns} distinct turns, "
        f"{sum(len(q.evidence) for q in questions)} evidence turns\n"
    )
    if written:
        seconds = sum(f.seconds for f in fills)
        out.append(
            f"fill: {written} turns stored through Reservoir.add (one call per session) in "
            f"{seconds:.1f} s ({seconds / written * 1000:.1f} ms per turn)\n"
        )
    else:
        out.append(f"fill: reused the filled store in {data_dir} ({turns} turns)\n")
    results: dict[str, list[Outcome]] = {}
    for strategy in strategies:
        started = time.perf_counter()
        results[strategy.key] = await run_strategy(strategy, data_dir, questions)
        print(
            f"strategy {strategy.label}: {len(questions)} questions in "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    out.append("## Turn recall per strategy\n")
    out.append(main_table(results, strategies) + "\n")
    notes = [f"- {s.label}: {s.note}" for s in strategies if s.note]
    if notes:
        out.append("strategies:\n" + "\n".join(notes) + "\n")
    out.append("## Asked on another user's scope\n")
    out.append(foreign_table(results, strategies) + "\n")
    out.append("## Turn recall per question type\n")
    out.append(type_table(results, strategies) + "\n")
    out.append("## Where the injected tokens go\n")
    out.append(token_table(results, strategies) + "\n")
    focus = "default@1000" if "default@1000" in results else strategies[0].key
    await candidate_ranks(data_dir, results[focus])
    out.append(f"## Missed evidence, {BY_KEY[focus].label}\n")
    out.append(missed_note(results[focus], candidate_depth(BY_KEY[focus])) + "\n")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(parse_args(argv), argv, run, "bench/longmemeval.py")


if __name__ == "__main__":
    sys.exit(main())
