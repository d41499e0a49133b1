"""Calibrates the relevance gate: `relevance_floor` (below it, no semantic
memory), then `relevance_full`, `relevance_band_tokens` and
`relevance_band_message_tokens` (between the two, only short messages).

    python bench/calibrate_relevance.py --lme-data-dir /work/lme-data \\
        --locomo-data-dir /work/locomo-data

Every question of both development splits (LoCoMo categories 1-4, LongMemEval_S)
is compared (`Reservoir.search`, cosine, as the semantic retriever) with its own scope and
with a foreign one (a deterministic derangement: LoCoMo questions go to the
next conversation, LongMemEval questions to the next question's haystack, in
file order). The feature is the best cosine similarity of the question to the
scope (what the built-in semantic retriever sees as its first candidate's
similarity). Printed: both distributions per dataset, and the chosen floor:
the lower of the two datasets' `--own-quantile` quantiles (default 2%) of the
own-scope best similarities, rounded down to 0.01 (one value for both), with
the share of own questions it keeps and of foreign ones it lets through.

Then the band: every question is asked (`Reservoir.enrich`, ungated, at
`--budget` tokens, default 1,000) on both scopes; the plan's units, best
first, with each message's tokens and the evidence it holds, are kept, and the
gate is simulated for every `relevance_full` from the floor to 0.60 (step
0.01), band of 100-300 tokens, longest message 80-160 tokens: a question at
or above `relevance_full` keeps what it got, one in the band the short
messages of its best units up to the band's tokens, one below the floor
nothing. Chosen: the setting with the fewest semantic tokens on another
user's scope (the larger of the two datasets' means) among those that lose at
most `--max-loss` (0.005: half the benches' allowance of 0.01, a margin for
held-out conversations) of evidence recall on each dataset, the higher
`relevance_full` on a tie; printed with what it gives, and, as a check that
it does not fit one split, the choice made on each dataset alone with what it
gives on the other. Check the choice with the benches (`--try
'g={"relevance_full": F}'`). Reads the filled stores of the two benchmarks
(`--data-dir` of bench/locomo.py and bench/longmemeval.py); fills nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import locomo
import longmemeval
import numpy as np

from reservoir_middleware import Reservoir, ReservoirSettings, Scope
from reservoir_middleware.memory.tokens import count_text
from reservoir_middleware.records import MessageRecord

DEPTH = 20
MODEL = locomo.MODEL
FULL_UP_TO = 0.60  # the highest relevance_full tried
BAND_TOKENS = (100, 150, 200, 250, 300)
LONGEST = (80, 100, 120, 160)


def derangement(n: int) -> list[int]:
    """i -> i + 1 (mod n): no item keeps its place (n >= 2)."""
    return [(i + 1) % n for i in range(n)]


async def best_similarities(
    data_dir: Path, pairs: list[tuple[str, Scope, Scope]]
) -> tuple[list[list[float]], list[list[float]]]:
    """For each (question, own scope, foreign scope): the `DEPTH` best similarities on each."""
    memory = Reservoir(ReservoirSettings(data_dir=data_dir, load_entry_points=False))
    await memory.warm_up()
    own: list[list[float]] = []
    foreign: list[list[float]] = []
    for text, mine, other in pairs:
        for scope, out in ((mine, own), (other, foreign)):
            top = await memory.search(scope.partition, scope.instance, text, limit=DEPTH)
            out.append([h.score for h in top] or [-1.0])
    await memory.close()
    return own, foreign


def locomo_pairs(dataset: Path) -> list[tuple[str, Scope, Scope]]:
    conversations = [locomo.load_conversation(p) for p in locomo.conversation_files(dataset, None)]
    other = derangement(len(conversations))
    return [
        (
            q.text,
            Scope(locomo.PARTITION, c.instance),
            Scope(locomo.PARTITION, conversations[other[i]].instance),
        )
        for i, c in enumerate(conversations)
        for q in c.questions
    ]


def lme_pairs(dataset: Path) -> list[tuple[str, Scope, Scope]]:
    files = longmemeval.question_files(dataset, None)
    questions = [longmemeval.load_question(p) for p in files]
    other = derangement(len(questions))
    return [
        (
            q.text,
            Scope(longmemeval.PARTITION, q.instance),
            Scope(longmemeval.PARTITION, questions[other[i]].instance),
        )
        for i, q in enumerate(questions)
    ]


def share_at_or_above(values: Sequence[float], floor: float) -> float:
    return sum(1 for v in values if v >= floor) / len(values)


def describe(name: str, own: list[float], foreign: list[float]) -> str:
    def q(values: list[float]) -> str:
        return " / ".join(f"{np.percentile(values, p):.3f}" for p in (1, 2, 5, 25, 50, 75, 95))

    return (
        f"{name}: {len(own)} questions; best similarity, percentiles 1/2/5/25/50/75/95:\n"
        f"  own scope     {q(own)}\n  foreign scope {q(foreign)}"
    )


async def run(args: argparse.Namespace) -> str:
    loc = await best_similarities(args.locomo_data_dir, locomo_pairs(args.locomo_dataset))
    lme = await best_similarities(args.lme_data_dir, lme_pairs(args.lme_dataset))
    if args.dump:
        args.dump.write_text(json.dumps({"locomo": loc, "longmemeval": lme}))
    (loc_own, loc_foreign), (lme_own, lme_foreign) = (
        ([t[0] for t in side] for side in pair) for pair in (loc, lme)
    )
    own = loc_own + lme_own
    lowest = min(float(np.quantile(o, args.own_quantile)) for o in (loc_own, lme_own))
    floor = math.floor(lowest * 100) / 100
    lines = [
        describe("LoCoMo", loc_own, loc_foreign),
        describe("LongMemEval", lme_own, lme_foreign),
    ]
    lines.append(
        f"chosen relevance_floor = {floor:.2f} (the lower of the two datasets' "
        f"{args.own_quantile:.0%} quantiles of the own-scope best similarities, "
        f"{len(own)} questions, rounded down to 0.01)"
    )
    for name, o, f in (("LoCoMo", loc_own, loc_foreign), ("LongMemEval", lme_own, lme_foreign)):
        lines.append(
            f"  {name}: own questions kept {share_at_or_above(o, floor):.1%}, "
            f"foreign questions let through {share_at_or_above(f, floor):.1%}"
        )
    sets = {
        "LoCoMo": await ask_all(
            args.locomo_data_dir, locomo_items(args.locomo_dataset), args.budget
        ),
        "LongMemEval": await ask_all(args.lme_data_dir, lme_items(args.lme_dataset), args.budget),
    }
    lines += choose_band(sets, floor, args.max_loss)
    return "\n".join(lines)


# -- the band: relevance_full, relevance_band_tokens, relevance_band_message_tokens --

Evidence = Callable[[MessageRecord], frozenset[int]]  # the evidence items a message holds


@dataclass
class Asked:
    """One question on one scope, ungated: its best similarity, the semantic
    tokens it got, its plan's units best first as (tokens, evidence) per
    message, and the evidence found outside semantic memory (recent window)."""

    best: float
    tokens: int
    units: list[list[tuple[int, frozenset[int]]]]
    found: frozenset[int]  # evidence among all the injected messages
    recent: frozenset[int]  # evidence in the recent window


@dataclass
class Question:
    evidence_count: int
    own: Asked
    foreign: Asked


async def ask_all(
    data_dir: Path, items: list[tuple[str, Scope, Scope, Evidence, int]], budget: int
) -> list[Question]:
    observer = locomo.PlanObserver()
    settings = ReservoirSettings(
        data_dir=data_dir,
        load_entry_points=False,
        context_token_budget=budget,
        relevance_floor=-1.0,
        relevance_full=-1.0,
    )
    memory = Reservoir(settings, plugins=[observer])
    await memory.warm_up()

    async def ask(text: str, scope: Scope, evidence: Evidence) -> Asked:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        observer.last = None
        result = await memory.enrich(scope.partition, scope.instance, body, store=False)
        lines = {m.id: m.tokens for m in result.semantic.messages}
        plan = observer.last.semantic if observer.last is not None else []
        units = [
            [(lines.get(r.id) or count_text(r.text, MODEL) + 8, evidence(r)) for r in u.records]
            for u in sorted(plan, key=lambda u: u.score, reverse=True)
        ]
        top = await memory.search(scope.partition, scope.instance, text, limit=1)
        injected = [*result.semantic.messages, *result.recent.messages]

        def held(messages: Sequence[object]) -> frozenset[int]:
            return frozenset().union(*(evidence(m) for m in messages))  # type: ignore[arg-type]

        return Asked(
            top[0].score if top else -1.0,
            result.semantic.tokens,
            units,
            held(injected),
            held(result.recent.messages),
        )

    out = []
    for text, mine, other, evidence, count in items:
        own = await ask(text, mine, evidence)
        foreign = await ask(text, other, lambda _: frozenset())
        out.append(Question(count, own, foreign))
    await memory.close()
    return out


def locomo_items(dataset: Path) -> list[tuple[str, Scope, Scope, Evidence, int]]:
    conversations = [locomo.load_conversation(p) for p in locomo.conversation_files(dataset, None)]
    other = derangement(len(conversations))
    items = []
    for i, c in enumerate(conversations):
        scope = Scope(locomo.PARTITION, c.instance)
        ids = {
            t.dia_id: id_
            for turns, chain in locomo.storage_batches(scope, c)
            for t, id_ in zip(turns, chain, strict=True)
        }
        for q in c.questions:
            where = {ids[e]: n for n, e in enumerate(q.evidence)}

            def evidence(r: MessageRecord, where: dict[str, int] = where) -> frozenset[int]:
                return frozenset([where[r.id]]) if r.id in where else frozenset()

            foreign = Scope(locomo.PARTITION, conversations[other[i]].instance)
            items.append((q.text, scope, foreign, evidence, len(q.evidence)))
    return items


def lme_items(dataset: Path) -> list[tuple[str, Scope, Scope, Evidence, int]]:
    questions = [longmemeval.load_question(p) for p in longmemeval.question_files(dataset, None)]
    other = derangement(len(questions))
    items = []
    for i, q in enumerate(questions):
        contents = [t.content for t in q.evidence]

        def evidence(r: MessageRecord, contents: list[str] = contents) -> frozenset[int]:
            return frozenset(n for n, c in enumerate(contents) if c in r.text)

        items.append(
            (
                q.text,
                Scope(longmemeval.PARTITION, q.instance),
                Scope(longmemeval.PARTITION, questions[other[i]].instance),
                evidence,
                len(contents),
            )
        )
    return items


def gated(
    asked: Asked, floor: float, full: float, cap: int, longest: int
) -> tuple[int, frozenset[int]]:
    """Semantic tokens and evidence found under the gate (simulated)."""
    if asked.best >= full:
        return asked.tokens, asked.found
    found, used = set(asked.recent), 0
    if asked.best >= floor:
        for unit in asked.units:
            for tokens, evidence in unit:
                if tokens > longest:
                    continue
                if used + tokens > cap:
                    return used, frozenset(found)
                used += tokens
                found |= evidence
    return used, frozenset(found)


def simulate(
    questions: list[Question], floor: float, full: float, cap: int, longest: int
) -> tuple[float, float]:
    """Evidence recall on the own scopes and mean semantic tokens on the foreign ones."""
    recall = [len(gated(q.own, floor, full, cap, longest)[1]) / q.evidence_count for q in questions]
    foreign = [gated(q.foreign, floor, full, cap, longest)[0] for q in questions]
    return float(np.mean(recall)), float(np.mean(foreign))


def choose_band(sets: dict[str, list[Question]], floor: float, max_loss: float) -> list[str]:
    names = list(sets)
    ungated = {n: simulate(sets[n], -1.0, -1.0, 0, 0) for n in names}
    fulls = [round(f / 100, 2) for f in range(math.ceil(floor * 100), int(FULL_UP_TO * 100) + 1)]
    grid = {
        (full, cap, longest): {n: simulate(sets[n], floor, full, cap, longest) for n in names}
        for full, cap, longest in itertools.product(fulls, BAND_TOKENS, LONGEST)
    }

    def pick(on: list[str]) -> tuple[float, int, int]:
        kept = [
            key
            for key, got in grid.items()
            if all(ungated[n][0] - got[n][0] <= max_loss for n in on)
        ]
        return min(kept, key=lambda key: (max(grid[key][n][1] for n in on), -key[0]))

    def shown(key: tuple[float, int, int]) -> str:
        return "; ".join(
            f"{n}: recall {grid[key][n][0]:.3f} ({grid[key][n][0] - ungated[n][0]:+.3f}), "
            f"{grid[key][n][1]:.0f} tokens on another scope (ungated {ungated[n][1]:.0f})"
            for n in names
        )

    best = pick(names)
    lines = [
        f"chosen relevance_full = {best[0]:.2f}, relevance_band_tokens = {best[1]}, "
        f"relevance_band_message_tokens = {best[2]} (fewest tokens on another scope, "
        f"recall loss at most {max_loss} on each dataset): {shown(best)}"
    ]
    for n in names:
        alone = pick([n])
        lines.append(
            f"  chosen on {n} alone: {alone[0]:.2f} / {alone[1]} / {alone[2]}: {shown(alone)}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locomo-dataset", type=Path, default=locomo.DATASET_DIR)
    parser.add_argument("--lme-dataset", type=Path, default=longmemeval.DATASET_DIR)
    parser.add_argument("--locomo-data-dir", type=Path, required=True)
    parser.add_argument("--lme-data-dir", type=Path, required=True)
    parser.add_argument("--own-quantile", type=float, default=0.02)
    parser.add_argument("--budget", type=int, default=1000, help="context_token_budget")
    parser.add_argument("--max-loss", type=float, default=0.005, help="of evidence recall")
    parser.add_argument("--dump", type=Path, help="write every similarity seen here (JSON)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rsv-calibrate-") as tmp:
        locomo.isolate_environment(Path(tmp))
        print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
