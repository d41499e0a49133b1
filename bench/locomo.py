"""How much of the evidence for LoCoMo questions `Reservoir.enrich` injects.

    python bench/locomo.py                                   # every strategy, all conversations
    python bench/locomo.py --strategies default,recent --conversations 30 --limit-questions 5
    python bench/locomo.py --data-dir ~/.cache/rsv-locomo    # keep the filled store, reuse it
    python bench/locomo.py --list-strategies

The LoCoMo conversations ("Evaluating Very Long-Term Conversational Memory of
LLM Agents", ACL 2024) are read from `../shared/datasets/locomo/` beside the
repository (see its README.md), or from `--dataset DIR`, or from the JSON
files named by `--conversations` (a file stem in the dataset directory such as
`30`, or a path).

Each conversation is stored in its own scope (partition `locomo`, instance
`conv-<stem>`) through the public `Reservoir.add`, one call per session
(chronological; speaker A as `user`, speaker B as `assistant`, each turn as
"Speaker: text", with its session's date as its time). The content-chained id of every turn
is computed beforehand, checked against what `add` wrote, and the scope's
count is checked too, so each turn is stored exactly once. The filled store is
shared by every strategy: several `Reservoir` objects with different settings
are opened, one after the other, over the same data directory (the stored
form does not depend on the settings compared here).

Every question of categories 1-4 that names evidence (category 5 is
adversarial: no answer in the conversation) is asked as a fresh request
`{"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}`
with `enrich(..., store=False)`; an evidence turn counts as injected when its
id is among the injected messages of the semantic or the recent section.
Reported per strategy: evidence recall (mean over questions of the fraction
of its evidence turns injected), the all-evidence hit rate, the mean injected
tokens (sum of `InjectedMessage.tokens` over both sections, section notes not
included) and the enrichment latency (wall time of `enrich`, in process, one
request at a time; a no-op plugin that records the plan before truncation,
for the diagnostics, is registered in every strategy).

The question is always the newest message, and the recent window holds the
conversation's last 15 turns, which almost never contain the evidence; the
window still takes its share of the token budget (by default at most a
quarter of it, `recent_budget_share`). That is real behaviour and is reported
as it is.

Each question is also asked on the next conversation's scope (another
user's memory; the conversations in order, a derangement): the mean semantic
tokens injected there (recent memory not counted), next to those on its own
scope, show whether unrelated memory fills the budget.

"default" is the built-in default: dense (MiniLM) and lexical (BM25)
candidates fused by reciprocal rank, filling the memory budget in rank order.
Rows marked "comparison" change one or two settings of it (or restore the
previous default) to show what each part contributes; they are plain
settings, no code of this file.

RSV_* environment variables and the user's config file are ignored, and no
entry-point plugins are loaded, so "default" means the code defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio.to_thread
from _harness import markdown_table, percentile

from reservoir_middleware import Reservoir, ReservoirSettings, Scope, hookimpl
from reservoir_middleware.builtins.lexical import LexicalRetrieval
from reservoir_middleware.context import (
    Candidate,
    ContextPlan,
    RetrievalQuery,
    TokenBudget,
)
from reservoir_middleware.memory.keywords import terms
from reservoir_middleware.records import chained_id
from reservoir_middleware.store import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
DATASET_DIR = ROOT.parent / "shared" / "datasets" / "locomo"
PARTITION = "locomo"
MODEL = "gpt-4o"
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
REFERENCE = (
    "reference (dataset README, all 10 LoCoMo conversations, 1,536 questions, retriever "
    "alone: no recent window, no notes): at 1,000 tokens dense (MiniLM) = 0.630, "
    "BM25 = 0.648, dense+BM25 RRF = 0.693, RRF + one neighbour turn each side = 0.686; "
    "top 7 / 15 / 30 turns: dense 0.408 / 0.507 / 0.616, dense+BM25 RRF 0.493 / 0.578 / 0.673, "
    "most recent turns 0.005 / 0.018 / 0.043"
)
DIA_ID = re.compile(r"D(\d+):(\d+)", re.IGNORECASE)

# -- the dataset ------------------------------------------------------------------


@dataclass
class Turn:
    dia_id: str
    speaker: str
    role: str
    text: str
    session: int

    @property
    def content(self) -> str:
        return f"{self.speaker}: {self.text}"


@dataclass
class Question:
    conversation: str
    index: int
    text: str
    category: int
    evidence: list[str]


@dataclass
class Conversation:
    name: str
    path: Path
    speaker_a: str
    speaker_b: str
    sessions: list[list[Turn]]
    questions: list[Question]
    dates: dict[int, datetime] = field(default_factory=dict)  # session number -> its time
    skipped_no_evidence: int = 0
    unknown_evidence: list[str] = field(default_factory=list)

    @property
    def instance(self) -> str:
        return f"conv-{self.name}"

    @property
    def turns(self) -> list[Turn]:
        return [t for session in self.sessions for t in session]


def normalise_dia_id(raw: str) -> str | None:
    """'D8:6', ' D8:06 ', 'd8 : 6' -> 'D8:6'; anything else -> None."""
    match = DIA_ID.fullmatch(re.sub(r"\s+", "", raw))
    return f"D{int(match.group(1))}:{int(match.group(2))}" if match else None


def normalise_evidence(raw: Any) -> list[str]:
    """Evidence ids without stray spaces, split where one string holds several
    ("D8:6; D9:17"), de-duplicated in order."""
    items = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        for part in re.split(r"[;,]|\s(?=D\d)", item):
            dia_id = normalise_dia_id(part)
            if dia_id and dia_id not in out:
                out.append(dia_id)
    return out


def load_conversation(path: Path) -> Conversation:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "conversation" in data:  # the locomo10.json layout
        data = {**data["conversation"], "qa": data.get("qa", [])}
    speaker_a, speaker_b = str(data["speaker_a"]), str(data["speaker_b"])
    numbers = sorted(
        int(key.split("_")[1])
        for key, value in data.items()
        if re.fullmatch(r"session_\d+", key) and isinstance(value, list)
    )
    sessions: list[list[Turn]] = []
    for number in numbers:
        session: list[Turn] = []
        for raw in data[f"session_{number}"]:
            speaker = str(raw["speaker"])
            if speaker not in (speaker_a, speaker_b):
                raise ValueError(f"{path}: unknown speaker {speaker!r} in session {number}")
            dia_id = normalise_dia_id(str(raw["dia_id"]))
            if dia_id is None:
                raise ValueError(f"{path}: unreadable dia_id {raw['dia_id']!r}")
            role = "user" if speaker == speaker_a else "assistant"
            session.append(Turn(dia_id, speaker, role, str(raw["text"]), number))
        if session:
            sessions.append(session)
    conversation = Conversation(path.stem, path, speaker_a, speaker_b, sessions, [])
    for number in numbers:
        raw_date = data.get(f"session_{number}_date_time")
        if isinstance(raw_date, str):
            conversation.dates[number] = session_date(raw_date)
    known = {t.dia_id for t in conversation.turns}
    if len(known) != len(conversation.turns):
        raise ValueError(f"{path}: duplicate dia_ids")
    for index, qa in enumerate(data.get("qa", [])):
        category = int(qa.get("category", 0))
        if category not in CATEGORIES:
            continue
        evidence = normalise_evidence(qa.get("evidence", []))
        conversation.unknown_evidence.extend(e for e in evidence if e not in known)
        evidence = [e for e in evidence if e in known]
        if not evidence:
            conversation.skipped_no_evidence += 1
            continue
        conversation.questions.append(
            Question(path.stem, index, str(qa["question"]), category, evidence)
        )
    return conversation


def session_date(raw: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> that minute, UTC."""
    return datetime.strptime(raw.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=timezone.utc)


def conversation_files(dataset: Path, selection: str | None) -> list[Path]:
    if not selection:
        if not dataset.is_dir():
            raise SystemExit(f"LoCoMo dataset directory not found: {dataset}")
        files = sorted(dataset.glob("*.json"))
        if not files:
            raise SystemExit(f"no LoCoMo conversation (*.json) in {dataset}")
        return files
    files = []
    for item in (s.strip() for s in selection.split(",")):
        if not item:
            continue
        path = Path(item)
        if not path.is_file():
            path = dataset / (item if item.endswith(".json") else f"{item}.json")
        if not path.is_file():
            raise SystemExit(f"LoCoMo conversation not found: {item} (looked in {dataset})")
        files.append(path)
    return files


# -- plugins used by the strategies -------------------------------------------------


class UserOnlySemantic:
    """The original Reservoir's semantic search: similar USER messages only.

    Replaces the built-in "semantic" plugin (disabled by name); like it, asks
    for more than needed so that the core can drop messages already in the
    request or the recent window, and asks for more again since assistant
    messages are thrown away here.
    """

    name = "semantic-user-only"

    @hookimpl
    async def reservoir_retrieve(
        self, query: RetrievalQuery, store: MemoryStore
    ) -> list[Candidate] | None:
        if query.embedding is None or query.semantic_limit <= 0:
            return None
        want = query.semantic_limit + len(query.request_ids) + query.recent_limit
        hits = await anyio.to_thread.run_sync(store.query, query.scope, query.embedding, want * 3)
        return [
            Candidate(record, "semantic", similarity, "semantic")
            for record, similarity in hits
            if record.role == "user" and similarity >= query.min_similarity
        ]


class PlanObserver:
    """Keeps the plan handed to truncation (before trimming), for the diagnostics."""

    name = "bench-plan-observer"

    def __init__(self) -> None:
        self.last: ContextPlan | None = None

    @hookimpl(tryfirst=True)
    async def reservoir_truncate(self, plan: ContextPlan, budget: TokenBudget) -> None:
        self.last = plan


# -- strategies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    key: str
    label: str
    settings: dict[str, Any]
    plugins: Callable[[], list[object]] = list
    comparison: bool = False
    note: str = ""


def _plugins(*factories: Callable[[], object]) -> Callable[[], list[object]]:
    return lambda: [make() for make in factories]


_AT_1000 = {"context_token_budget": 1000}
# The built-in default before hybrid retrieval: dense only, the top 7 with their
# answers, the recent window first (semantic memory dropped first under the budget).
_PREVIOUS = {"disable_plugins": ["lexical"], "fill_budget": False, "recent_budget_share": 1.0}

STRATEGIES: list[Strategy] = [
    Strategy(
        "recent",
        "recent only",
        {"semantic_context_size": 0, "context_token_budget": None},
        note="the 15 most recent turns, no budget",
    ),
    Strategy(
        "original",
        "original Reservoir",
        {
            "semantic_context_size": 7,
            "recent_context_size": 15,
            "context_token_budget": None,
            "pair_answers": False,
            "synapse_neighbours": 0,
            "disable_plugins": ["semantic", "lexical"],
        },
        _plugins(UserOnlySemantic),
        note="7 most similar user messages (dense only) + 15 most recent, no budget",
    ),
    Strategy("default", "default", {}, note="ReservoirSettings() as it is (budget 2,000)"),
    Strategy("default@500", "default @500", {"context_token_budget": 500}),
    Strategy("default@1000", "default @1000", _AT_1000),
    Strategy("default@2000", "default @2000", {"context_token_budget": 2000}),
    Strategy(
        "previous@1000",
        "previous default @1000",
        {**_AT_1000, **_PREVIOUS},
        comparison=True,
        note="before hybrid retrieval: disable_plugins=lexical, fill_budget=false, "
        "recent_budget_share=1.0 (dense top 7 with answers, recent window first)",
    ),
    Strategy(
        "dense@1000",
        "dense only @1000",
        {**_AT_1000, "disable_plugins": ["lexical"]},
        comparison=True,
        note="defaults without the lexical plugin (disable_plugins=lexical)",
    ),
    Strategy(
        "recentfirst@1000",
        "recent first @1000",
        {**_AT_1000, "recent_budget_share": 1.0},
        comparison=True,
        note="defaults with recent_budget_share=1.0: the recent window before semantic memory",
    ),
    Strategy(
        "nopair@1000",
        "no pairing @1000",
        {**_AT_1000, "pair_answers": False, "synapse_neighbours": 0},
        comparison=True,
        note="defaults without answer pairing and synapse neighbours",
    ),
    Strategy(
        "allpairs@1000",
        "20 best hits paired @1000",
        {**_AT_1000, "semantic_context_size": 20},
        comparison=True,
        note="defaults with semantic_context_size=20: each of the best 20 hits brings its "
        "answer right after it (default: the best 7)",
    ),
    Strategy(
        "candidates30@1000",
        "30 candidates @1000",
        {**_AT_1000, "semantic_candidates": 30},
        comparison=True,
        note="defaults with semantic_candidates=30: each retriever proposes 30 (default: 20)",
    ),
    Strategy(
        "nofade@1000",
        "recent share not fading @1000",
        {**_AT_1000, "recent_fade_hours": 0},
        comparison=True,
        note="defaults with recent_fade_hours=0: the recent window keeps its share of the "
        "budget however old the scope's newest message is",
    ),
    Strategy(
        "longpair@1000",
        "long answers right after their hit @1000",
        {**_AT_1000, "long_message_tokens": 0},
        comparison=True,
        note="defaults with long_message_tokens=0: a hit's answer comes right after it, "
        "however long (default: over 150 tokens it waits until every hit that fits is in)",
    ),
    Strategy(
        "noneighbours@1000",
        "BM25 without neighbour words @1000",
        {**_AT_1000, "lexical_neighbour_weight": 0.0},
        comparison=True,
        note="defaults with lexical_neighbour_weight=0: BM25 keys each message with its own "
        "words only (default: its neighbours' words too, at 0.5)",
    ),
    Strategy(
        "dense-norecent@1000",
        "dense @1000, no recent window",
        {
            **_AT_1000,
            "disable_plugins": ["lexical"],
            "recent_context_size": 0,
            "semantic_candidates": 60,
        },
        comparison=True,
        note="dense retriever alone, 60 candidates (enough to fill the budget), comparable "
        "with the README reference (dense @1000)",
    ),
    Strategy(
        "hybrid-norecent@1000",
        "hybrid @1000, no recent window",
        {**_AT_1000, "recent_context_size": 0},
        comparison=True,
        note="hybrid retriever alone, comparable with the README reference (dense+BM25 RRF @1000)",
    ),
]
BY_KEY = {s.key: s for s in STRATEGIES}
DEFAULT_BUDGET = ReservoirSettings.model_fields["context_token_budget"].default
ALIASES = {"recentonly": "recent", "recent-only": "recent", "original-reservoir": "original"}


def pick_strategies(selection: str | None) -> list[Strategy]:
    if not selection:
        return list(STRATEGIES)
    picked = []
    for raw in (s.strip() for s in selection.split(",")):
        if not raw:
            continue
        key = ALIASES.get(raw.replace(" ", "").lower(), raw.replace(" ", "").lower())
        if key not in BY_KEY:
            known = ", ".join(BY_KEY)
            raise SystemExit(f"unknown strategy {raw!r}; known: {known}")
        picked.append(BY_KEY[key])
    return picked


def tried_strategies(tries: Sequence[str]) -> list[Strategy]:
    """Strategies given on the command line (`--try NAME=JSON`), for exploring settings."""
    out = []
    for item in tries:
        name, _, raw = item.partition("=")
        settings = json.loads(raw)
        ReservoirSettings(**settings)  # refuse an unknown or invalid setting now
        strategy = Strategy(name, name, settings, comparison=True, note=f"--try {raw}")
        BY_KEY[name] = strategy
        out.append(strategy)
    return out


def build_reservoir(strategy: Strategy, data_dir: Path) -> tuple[Reservoir, PlanObserver]:
    observer = PlanObserver()
    settings = ReservoirSettings(data_dir=data_dir, load_entry_points=False, **strategy.settings)
    return Reservoir(settings, plugins=[*strategy.plugins(), observer]), observer


# -- filling the store -------------------------------------------------------------


@dataclass
class Fill:
    conversation: str
    turns: int
    written: int
    seconds: float
    reused: bool


def storage_batches(scope: Scope, conversation: Conversation) -> list[tuple[list[Turn], list[str]]]:
    """One batch per session, with the content-chained ids `add` will give its turns.

    A batch's first turn chains to nothing; should its id equal one already
    used (the same first line in two sessions), it is merged into the batch
    before, so that every turn gets its own id and is stored exactly once.
    """
    batches: list[tuple[list[Turn], list[str]]] = []
    used: set[str] = set()
    for session in conversation.sessions:
        if batches:
            first = chained_id(scope, session[0].role, session[0].content, None, None)
            if first in used:
                batches[-1][0].extend(session)
                used.difference_update(batches[-1][1])
                batches[-1] = (batches[-1][0], _chain(scope, batches[-1][0]))
                used.update(batches[-1][1])
                continue
        ids = _chain(scope, session)
        batches.append((list(session), ids))
        used.update(ids)
    if len(used) != len(conversation.turns):
        raise RuntimeError(f"conversation {conversation.name}: turns with the same id")
    return batches


def _chain(scope: Scope, turns: Sequence[Turn]) -> list[str]:
    ids: list[str] = []
    prev: str | None = None
    for turn in turns:
        prev = chained_id(scope, turn.role, turn.content, None, prev)
        ids.append(prev)
    return ids


async def fill(memory: Reservoir, conversation: Conversation) -> tuple[Fill, dict[str, str]]:
    """Store the conversation (or find it stored already); returns dia_id -> message id."""
    scope = Scope(PARTITION, conversation.instance)
    batches = storage_batches(scope, conversation)
    ids = {t.dia_id: i for turns, chain in batches for t, i in zip(turns, chain, strict=True)}
    total = len(ids)
    stored = await anyio.to_thread.run_sync(memory.store.count, scope)
    if stored == total:
        found = await anyio.to_thread.run_sync(memory.store.existing_ids, scope, list(ids.values()))
        if len(found) == total:
            return Fill(conversation.name, total, 0, 0.0, True), ids
    if stored:
        await memory.delete(PARTITION, conversation.instance)
    started = time.perf_counter()
    written = 0
    for turns, chain in batches:
        messages = [{"role": t.role, "content": t.content} for t in turns]
        at = conversation.dates.get(turns[0].session)
        new = await memory.add(PARTITION, conversation.instance, messages, timestamp=at)
        if new != chain:
            raise RuntimeError(
                f"conversation {conversation.name}: add() wrote {len(new)} of {len(chain)} "
                f"turns of session {turns[0].session} (or other ids than expected)"
            )
        written += len(new)
    seconds = time.perf_counter() - started
    stored = await anyio.to_thread.run_sync(memory.store.count, scope)
    if stored != total or written != total:
        raise RuntimeError(
            f"conversation {conversation.name}: {total} turns, {written} written, "
            f"{stored} in the store"
        )
    return Fill(conversation.name, total, written, seconds, False), ids


# -- measuring ----------------------------------------------------------------------


@dataclass
class Outcome:
    question: Question
    evidence_ids: list[str]
    semantic_ids: list[str]
    recent_ids: list[str]
    semantic_tokens: int
    recent_tokens: int
    latency_ms: float
    planned_ids: list[str]  # semantic messages before truncation, best unit first
    planned_hits: set[str]  # the retrieved hit of each unit (not its pair or neighbours)
    foreign_semantic_tokens: int | None = None  # asked on another conversation's scope
    block_tokens: int = 0  # the whole memory block as sent: lines, dates, notes, frame

    @property
    def injected(self) -> set[str]:
        return {*self.semantic_ids, *self.recent_ids}

    @property
    def found(self) -> int:
        return sum(1 for e in self.evidence_ids if e in self.injected)

    @property
    def recall(self) -> float:
        return self.found / len(self.evidence_ids)

    @property
    def tokens(self) -> int:
        return self.semantic_tokens + self.recent_tokens

    @property
    def note_tokens(self) -> int:
        """The block's frame, section notes and date lines, which count against the budget too."""
        return max(0, self.block_tokens - self.tokens)


async def run_strategy(
    strategy: Strategy,
    data_dir: Path,
    conversations: list[Conversation],
    dia_ids: dict[str, dict[str, str]],
    limit: int | None,
) -> list[Outcome]:
    memory, observer = build_reservoir(strategy, data_dir)
    await memory.warm_up()
    for conversation in conversations:  # open each collection, load caches: not measured
        warm = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
        await memory.enrich(PARTITION, conversation.instance, warm, store=False)
    outcomes: list[Outcome] = []
    for conversation in conversations:
        ids = dia_ids[conversation.name]
        for question in conversation.questions[:limit]:
            body = {"model": MODEL, "messages": [{"role": "user", "content": question.text}]}
            observer.last = None
            started = time.perf_counter()
            result = await memory.enrich(PARTITION, conversation.instance, body, store=False)
            elapsed = (time.perf_counter() - started) * 1000
            if result.failures:
                raise RuntimeError(f"{strategy.label}: plugin failures {result.failures}")
            units = observer.last.semantic if observer.last is not None else []
            units = sorted(units, key=lambda u: u.score, reverse=True)
            outcomes.append(
                Outcome(
                    question,
                    [ids[e] for e in question.evidence],
                    [m.id for m in result.semantic.messages],
                    [m.id for m in result.recent.messages],
                    result.semantic.tokens,
                    result.recent.tokens,
                    elapsed,
                    [r.id for unit in units for r in unit.records],
                    {unit.hit_id for unit in units},
                    block_tokens=result.memory_tokens,
                )
            )
    others = foreign_scopes([c.instance for c in conversations])
    asked = iter(outcomes)
    for conversation, other in zip(conversations, others, strict=True):
        for question, outcome in zip(conversation.questions[:limit], asked, strict=False):
            if other is not None:
                body = {"model": MODEL, "messages": [{"role": "user", "content": question.text}]}
                result = await memory.enrich(PARTITION, other, body, store=False)
                outcome.foreign_semantic_tokens = result.semantic.tokens
    return outcomes


def foreign_scopes(instances: Sequence[str]) -> list[str | None]:
    """For each scope, another one to ask its questions on (the next, in order:
    a derangement); None with a single scope."""
    if len(instances) < 2:
        return [None] * len(instances)
    return [instances[(i + 1) % len(instances)] for i in range(len(instances))]


def foreign_table(results: dict[str, list[Any]], strategies: list[Strategy]) -> str:
    """Mean semantic tokens (recent memory not counted) injected for a question on
    its own scope and on another user's scope, and that second one against the budget."""
    rows = []
    for s in strategies:
        out = results[s.key]
        foreign = [o.foreign_semantic_tokens for o in out if o.foreign_semantic_tokens is not None]
        if not foreign:
            continue
        budget = s.settings.get("context_token_budget", DEFAULT_BUDGET)
        share = f"{mean(foreign) / budget:.1%}" if budget else "no budget"
        rows.append(
            [
                s.label,
                f"{mean([o.semantic_tokens for o in out]):.1f}",
                f"{mean(foreign):.1f}",
                share,
            ]
        )
    if not rows:
        return "(a single scope: no other user's scope to ask on)"
    header = ["strategy", "own scope semantic tokens", "other scope semantic tokens", "of budget"]
    return markdown_table(header, rows, "lrrr")


async def dense_and_lexical_ranks(
    data_dir: Path,
    conversations: list[Conversation],
    limit: int | None,
) -> dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]]:
    """Per question: the rank (1-based) of every stored message by dense cosine
    and by BM25 (the built-in lexical index), for the missed-evidence diagnostics."""
    memory, _ = build_reservoir(BY_KEY["default"], data_dir)
    lexical = LexicalRetrieval(blocking_build=10**9)
    out: dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]] = {}
    for conversation in conversations:
        scope = Scope(PARTITION, conversation.instance)
        total = await anyio.to_thread.run_sync(memory.store.count, scope)
        index = await anyio.to_thread.run_sync(lexical.index, scope, memory.store)
        assert index is not None
        for question in conversation.questions[:limit]:
            hits = await memory.search(PARTITION, conversation.instance, question.text, limit=total)
            dense = {h.record.id: rank for rank, h in enumerate(hits, 1)}
            ranked = index.top(terms(question.text), total)
            bm25 = {id_: rank for rank, (id_, _) in enumerate(ranked, 1)}
            out[(question.conversation, question.index)] = (dense, bm25)
    return out


# -- report -----------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def strategy_table(
    results: dict[str, list[Any]],
    strategies: list[Strategy],
    columns: Sequence[tuple[str, Callable[[Any], float]]],
    latency: str = "latency",
) -> str:
    """One row per strategy: its questions, the mean of each column over them
    (a fraction), the mean injected tokens and the latency percentiles."""
    rows = []
    for s in strategies:
        out = results[s.key]
        lat = [o.latency_ms for o in out]
        rows.append(
            [
                s.label + (" (comparison)" if s.comparison else ""),
                str(len(out)),
                *(f"{mean([value(o) for o in out]):.3f}" for _, value in columns),
                f"{mean([o.tokens for o in out]):.1f}",
                f"{percentile(lat, 50):.1f}",
                f"{percentile(lat, 99):.1f}",
            ]
        )
    header = [
        "strategy",
        "questions",
        *(name for name, _ in columns),
        "mean injected tokens",
        f"{latency} p50 ms",
        f"{latency} p99 ms",
    ]
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


def main_table(results: dict[str, list[Outcome]], strategies: list[Strategy]) -> str:
    columns: list[tuple[str, Callable[[Outcome], float]]] = [
        ("evidence recall", lambda o: o.recall),
        ("all-evidence hit rate", lambda o: float(o.found == len(o.evidence_ids))),
    ]
    return strategy_table(results, strategies, columns)


def token_table(results: dict[str, list[Outcome]], strategies: list[Strategy]) -> str:
    rows = []
    for s in strategies:
        out = results[s.key]
        sem_tok = mean([o.semantic_tokens for o in out])
        rec_tok = mean([o.recent_tokens for o in out])
        total = sem_tok + rec_tok
        ev_total = sum(len(o.evidence_ids) for o in out)
        via_sem = sum(1 for o in out for e in o.evidence_ids if e in o.semantic_ids)
        via_rec = sum(1 for o in out for e in o.evidence_ids if e in o.recent_ids)
        budget = s.settings.get("context_token_budget", DEFAULT_BUDGET)
        left = (
            f"{mean([budget - o.tokens - o.note_tokens for o in out]):.1f}"
            if budget is not None
            else "no budget"
        )
        rows.append(
            [
                s.label,
                f"{mean([len(o.semantic_ids) for o in out]):.1f}",
                f"{sem_tok:.1f}",
                f"{mean([len(o.recent_ids) for o in out]):.1f}",
                f"{rec_tok:.1f}",
                f"{(rec_tok / total if total else 0):.0%}",
                f"{mean([o.note_tokens for o in out]):.1f}",
                left,
                f"{via_sem}/{ev_total}",
                f"{via_rec}/{ev_total}",
            ]
        )
    header = [
        "strategy",
        "semantic msgs",
        "semantic tokens",
        "recent msgs",
        "recent tokens",
        "recent share",
        "frame, notes, dates",
        "budget left",
        "evidence via semantic",
        "evidence via recent",
    ]
    return markdown_table(header, rows, "lrrrrrrrrr")


def breakdown_table(
    results: dict[str, list[Outcome]],
    strategies: list[Strategy],
    key: Callable[[Outcome], Any],
    columns: list[tuple[Any, str]],
) -> str:
    rows = []
    counts = []
    for value, _ in columns:
        any_strategy = next(iter(results.values()))
        counts.append(sum(1 for o in any_strategy if key(o) == value))
    for s in strategies:
        row = [s.label]
        for value, _ in columns:
            group = [o.recall for o in results[s.key] if key(o) == value]
            row.append(f"{mean(group):.3f}" if group else "-")
        rows.append(row)
    header = ["strategy"] + [
        f"{name} (n={n})" for (_, name), n in zip(columns, counts, strict=True)
    ]
    return markdown_table(header, rows, "l" + "r" * len(columns))


def missed_evidence(
    outcomes: list[Outcome],
    ranks: dict[tuple[str, int], tuple[dict[str, int], dict[str, int]]],
    depth: int,
) -> str:
    total = sum(len(o.evidence_ids) for o in outcomes)
    missed = [(o, e) for o in outcomes for e in o.evidence_ids if e not in o.injected]
    cut = [(o, e) for o, e in missed if e in o.planned_ids]
    not_planned = [(o, e) for o, e in missed if e not in o.planned_ids]
    bounds = [(depth, f"1-{depth}"), (100, f"{depth + 1}-100"), (10**9, "over 100")]
    dense_buckets = dict.fromkeys((name for _, name in bounds), 0)
    bm25_buckets = {**dict.fromkeys((name for _, name in bounds), 0), "no shared word": 0}
    for o, e in not_planned:
        dense, bm25 = ranks[(o.question.conversation, o.question.index)]
        rank = dense.get(e, 10**9)
        dense_buckets[next(name for bound, name in bounds if rank <= bound)] += 1
        if e not in bm25:
            bm25_buckets["no shared word"] += 1
        else:
            bm25_buckets[next(name for bound, name in bounds if bm25[e] <= bound)] += 1
    questions_cut = sum(
        1
        for o in outcomes
        if any(e in o.planned_ids and e not in o.injected for e in o.evidence_ids)
    )
    lines = [
        f"- evidence turns: {total}; injected {total - len(missed)}; missed {len(missed)}",
        f"- missed but retrieved, then cut by the token budget: "
        f"{len(cut)} turns ({len(cut) / total:.1%} of all evidence), in "
        f"{questions_cut} of {len(outcomes)} questions",
        f"- missed and not retrieved ({len(not_planned)} turns; candidates: each retriever's "
        f"top {depth}), by dense rank among all turns of the conversation: "
        + ", ".join(f"{name}: {n}" for name, n in dense_buckets.items())
        + "; by BM25 rank: "
        + ", ".join(f"{name}: {n}" for name, n in bm25_buckets.items())
        + f" (a dense rank within the top {depth} means a similarity below min_similarity, "
        "or a turn already in the recent window)",
    ]
    return "\n".join(lines)


def candidate_depth(strategy: Strategy) -> int:
    """How many semantic candidates each retriever proposes under a strategy."""
    cfg = ReservoirSettings(**strategy.settings)
    if cfg.fill_budget and cfg.context_token_budget is not None:
        return max(cfg.semantic_context_size, cfg.semantic_candidates)
    return cfg.semantic_context_size


def pairing_note(results: dict[str, list[Outcome]]) -> str:
    lines = []
    for with_pairs, without in (
        ("default@1000", "nopair@1000"),
        ("allpairs@1000", "nopair@1000"),
    ):
        if with_pairs not in results or without not in results:
            continue
        pair, nopair = results[with_pairs], results[without]
        better = sum(1 for a, b in zip(pair, nopair, strict=True) if a.recall > b.recall)
        worse = sum(1 for a, b in zip(pair, nopair, strict=True) if a.recall < b.recall)
        via_pair = sum(
            1
            for o in pair
            for e in o.evidence_ids
            if e in o.semantic_ids and e not in o.planned_hits
        )
        lines.append(
            f"- answer pairing, {BY_KEY[with_pairs].label} vs {BY_KEY[without].label}: "
            f"recall {mean([o.recall for o in pair]):.3f} with pairs, "
            f"{mean([o.recall for o in nopair]):.3f} without; better with pairs on {better} "
            f"questions, worse on {worse}; {via_pair} evidence turns came in only as a hit's "
            f"pair or synapse neighbour"
        )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def isolate_environment(directory: Path) -> None:
    """Code defaults only: no RSV_* variables, no config file."""
    for name in list(os.environ):
        if name.startswith("RSV_"):
            del os.environ[name]
    os.environ["RSV_CONFIG_FILE"] = str(directory / "no-config.toml")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET_DIR, help="LoCoMo directory")
    parser.add_argument(
        "--conversations", help="comma separated file stems in --dataset, or JSON paths"
    )
    parser.add_argument(
        "--limit-questions",
        type=int,
        help="ask only the first N scored questions of each conversation",
    )
    add_common_arguments(parser)
    return parser.parse_args(argv)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both retrieval benchmarks take: strategies and the store."""
    parser.add_argument("--strategies", help="comma separated keys (see --list-strategies)")
    parser.add_argument("--data-dir", type=Path, help="keep the filled store here and reuse it")
    parser.add_argument("--list-strategies", action="store_true")
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='an extra strategy: settings over the defaults, e.g. c40={"semantic_candidates": 40}',
    )


async def run(args: argparse.Namespace, data_dir: Path) -> str:
    strategies = pick_strategies(args.strategies) + tried_strategies(args.tries)
    files = conversation_files(args.dataset, args.conversations)
    conversations = [load_conversation(p) for p in files]
    limit = args.limit_questions
    out: list[str] = []
    command = shlex.join([sys.executable, *args.command])
    out.append("# LoCoMo evidence recall through Reservoir.enrich\n")
    out.append(f"command: `cd {shlex.quote(os.getcwd())} && {command}`\n")
    out.append(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; model {MODEL!r} (o200k_base tokens)\n"
    )
    # fill
    filler = Reservoir(ReservoirSettings(data_dir=data_dir, load_entry_points=False))
    await filler.warm_up()
    fills: list[Fill] = []
    dia_ids: dict[str, dict[str, str]] = {}
    for conversation in conversations:
        filled, ids = await fill(filler, conversation)
        fills.append(filled)
        dia_ids[conversation.name] = ids
        state = "reused" if filled.reused else f"stored in {filled.seconds:.1f} s"
        print(f"conversation {conversation.name}: {filled.turns} turns {state}", file=sys.stderr)
    await filler.settle()
    written = sum(f.written for f in fills)
    fill_s = sum(f.seconds for f in fills)
    turns_total = sum(f.turns for f in fills)
    questions = sum(len(c.questions[:limit]) for c in conversations)
    lines = []
    for c, f in zip(conversations, fills, strict=True):
        skipped = (
            f", {c.skipped_no_evidence} without evidence skipped" if c.skipped_no_evidence else ""
        )
        unknown = (
            f", {len(c.unknown_evidence)} unknown evidence ids dropped"
            if c.unknown_evidence
            else ""
        )
        lines.append(
            f"- {c.name}.json ({c.speaker_a} = user, {c.speaker_b} = assistant): "
            f"{f.turns} turns in {len(c.sessions)} sessions, "
            f"{len(c.questions[:limit])} of {len(c.questions)} scored questions{skipped}{unknown}"
        )
    out.append(
        f"dataset: {args.dataset if not args.conversations else ', '.join(str(p) for p in files)}\n"
        + "\n".join(lines)
        + "\n"
    )
    if written:
        out.append(
            f"fill: {written} turns stored through Reservoir.add (one call per session) in "
            f"{fill_s:.1f} s ({fill_s / written * 1000:.1f} ms per turn); every turn stored once "
            f"({turns_total} in the store)\n"
        )
    else:
        out.append(f"fill: reused the filled store in {data_dir} ({turns_total} turns)\n")
    # measure
    results: dict[str, list[Outcome]] = {}
    for strategy in strategies:
        started = time.perf_counter()
        results[strategy.key] = await run_strategy(
            strategy, data_dir, conversations, dia_ids, limit
        )
        print(
            f"strategy {strategy.label}: {questions} questions in "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    out.append("## Evidence recall per strategy\n")
    out.append(main_table(results, strategies) + "\n")
    out.append(REFERENCE + "\n")
    if "dense-norecent@1000" in results:
        calibration = mean([o.recall for o in results["dense-norecent@1000"]])
        out.append(
            f"calibration: {BY_KEY['dense-norecent@1000'].label} is the reference's dense "
            f"retriever at 1,000 tokens (plus the section note): {calibration:.3f} here vs 0.630 "
            f"on all ten conversations, so these conversations are "
            f"{'easier' if calibration > 0.630 else 'harder'} than the ten on average; "
            "compare strategies with each other rather than with the reference.\n"
        )
    notes = [f"- {s.label}: {s.note}" for s in strategies if s.note]
    if notes:
        out.append("strategies:\n" + "\n".join(notes) + "\n")
    out.append("## Asked on another user's scope\n")
    out.append(foreign_table(results, strategies) + "\n")
    out.append("## Where the injected tokens go\n")
    out.append(token_table(results, strategies) + "\n")
    out.append(
        "(the question is the newest message, so the recent window holds the conversation's "
        "last turns: rarely evidence, yet it takes its share of the budget)\n"
    )
    out.append("## Evidence recall per category\n")
    categories = [(c, f"{c} {name}") for c, name in CATEGORIES.items()]
    out.append(
        breakdown_table(results, strategies, lambda o: o.question.category, categories) + "\n"
    )
    out.append("## Evidence recall per conversation\n")
    convs = [(c.name, f"{c.name}.json") for c in conversations]
    out.append(
        breakdown_table(results, strategies, lambda o: o.question.conversation, convs) + "\n"
    )
    focus = "default@1000" if "default@1000" in results else strategies[0].key
    ranks = await dense_and_lexical_ranks(data_dir, conversations, limit)
    out.append(f"## Missed evidence, {BY_KEY[focus].label}\n")
    out.append(missed_evidence(results[focus], ranks, candidate_depth(BY_KEY[focus])) + "\n")
    pairing = pairing_note(results)
    if pairing:
        out.append("## Answer pairing\n")
        out.append(pairing + "\n")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(parse_args(argv), argv, run, "bench/locomo.py")


def bench_main(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace, Path], Awaitable[str]],
    script: str,
) -> int:
    """List the strategies, or run the benchmark on code defaults and print its report."""
    script = sys.argv[0] if argv is None and sys.argv[0] else script
    args.command = [script, *(sys.argv[1:] if argv is None else argv)]
    if args.list_strategies:
        for s in STRATEGIES:
            flag = " (comparison)" if s.comparison else ""
            print(f"{s.key:22} {s.label}{flag}: {s.note or s.settings}")
        return 0
    with tempfile.TemporaryDirectory(prefix="rsv-bench-") as tmp:
        isolate_environment(Path(tmp))
        data_dir = args.data_dir.expanduser() if args.data_dir else Path(tmp) / "data"
        report = asyncio.run(run(args, data_dir))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
