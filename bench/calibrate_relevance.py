"""Calibrates `relevance_floor`: how similar a question must be to a scope for
its semantic memory to be injected (below it: its best hit alone).

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
Check the choice with the benches (`--try 'f={"relevance_floor": F}'`):
turn recall must stay within 0.01 of `relevance_floor=-1`. Reads the filled
stores of the two benchmarks (`--data-dir` of bench/locomo.py and
bench/longmemeval.py); fills nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import locomo
import longmemeval
import numpy as np

from reservoir_middleware import Reservoir, ReservoirSettings, Scope

DEPTH = 20


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
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locomo-dataset", type=Path, default=locomo.DATASET_DIR)
    parser.add_argument("--lme-dataset", type=Path, default=longmemeval.DATASET_DIR)
    parser.add_argument("--locomo-data-dir", type=Path, required=True)
    parser.add_argument("--lme-data-dir", type=Path, required=True)
    parser.add_argument("--own-quantile", type=float, default=0.02)
    parser.add_argument("--dump", type=Path, help="write every similarity seen here (JSON)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rsv-calibrate-") as tmp:
        locomo.isolate_environment(Path(tmp))
        print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
