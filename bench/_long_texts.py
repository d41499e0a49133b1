"""Stored messages that look like LongMemEval's, for `overhead.py --texts lme`.

What a gateway in front of a chat assistant stores: short user turns and long
assistant answers (often 300-800 tokens). The (user, assistant) pairs of the
LongMemEval_S development split in `../shared/datasets/longmemeval/` are used
when it is there (read only to make the benchmark's stored messages; in a
fixed order, so a seed gives the same messages), else similar ones are
generated from a seed.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

DATASET_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "longmemeval"
CHEAP_WORDS = 48  # --cheap-vectors: what of a message is embedded

Pair = tuple[str, str]


def _split(text: str) -> list[str]:
    return text.split("|")


_TOPICS = _split(
    "planning a trip to Lisbon|training for a half marathon|repotting houseplants|"
    "learning Spanish|budgeting for a new car|a sourdough starter|setting up a home office|"
    "choosing a laptop for video editing|a birthday party for a ten-year-old|"
    "fixing a slow Wi-Fi network|writing a cover letter|growing tomatoes on a balcony"
)
_STEPS = _split(
    "Start with {a}, since it makes everything after it easier.|"
    "Keep a short log of {a}; after two weeks the pattern is obvious.|"
    "If {a} feels like too much, try {b} first and come back to it.|"
    "Many people overlook {a}, but it matters more than {b}.|"
    "Set aside twenty minutes on {day} for {a}.|"
    "Compare {a} with {b}: the cheaper one is often good enough.|"
    "Ask a friend who has done {a} before; they will know the pitfalls of {b}.|"
    "Do not worry about {b} yet; {a} is the part that decides the outcome."
)
_THINGS = _split(
    "the budget|the schedule|a checklist|the equipment|the first week|a backup plan|"
    "the reviews|a test run|the warranty|the weather|the deadline|the shopping list"
)
_DAYS = _split("Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday")


def generated_pair(rng: random.Random) -> Pair:
    """A question about a topic and a long, list-shaped answer (about 300-800 tokens)."""
    topic = rng.choice(_TOPICS)
    user = f"Can you help me with {topic}? I have {rng.randint(2, 9)} weeks and not much time."
    lines = [f"Of course! Here is a plan for {topic}, step by step:", ""]
    for n in range(1, rng.randint(6, 14) + 1):
        sentences = [
            rng.choice(_STEPS).format(
                a=rng.choice(_THINGS), b=rng.choice(_THINGS), day=rng.choice(_DAYS)
            )
            for _ in range(rng.randint(2, 4))
        ]
        lines.append(f"{n}. **Step {n}.** " + " ".join(sentences))
    lines += ["", f"Let me know how {topic} goes, and I can adjust the plan."]
    return user, "\n".join(lines)


def dataset_pairs(directory: Path = DATASET_DIR) -> list[Pair]:
    """Every distinct (user, assistant) pair of the development split, in file order."""
    pairs: dict[Pair, None] = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for session in data.get("haystack_sessions", []):
            turns = [t for t in session if str(t.get("content", "")).strip()]
            for first, second in itertools.pairwise(turns):
                if first.get("role") == "user" and second.get("role") == "assistant":
                    pairs[(str(first["content"]), str(second["content"]))] = None
    return list(pairs)


class LongTexts:
    """Messages of LongMemEval-like exchanges: even indexes are user turns, each
    odd one the answer to the turn before it."""

    def __init__(self, directory: Path = DATASET_DIR) -> None:
        self.pairs = dataset_pairs(directory) if directory.is_dir() else []
        self.source = (
            f"LongMemEval_S development split ({len(self.pairs)} user/assistant pairs)"
            if self.pairs
            else "generated (the LongMemEval development split is not there)"
        )
        self._current: Pair | None = None

    def message(self, rng: random.Random, index: int) -> dict[str, str]:
        if index % 2 == 0 or self._current is None:
            self._current = rng.choice(self.pairs) if self.pairs else generated_pair(rng)
            if index % 2 == 0:
                return {"role": "user", "content": self._current[0]}
        return {"role": "assistant", "content": self._current[1]}


def cheap(texts: list[str]) -> list[str]:
    """What `--cheap-vectors` embeds of each text: its first CHEAP_WORDS words."""
    return [" ".join(text.split()[:CHEAP_WORDS]) for text in texts]
