"""`relevance_floor`, `relevance_full`: a question unrelated to everything
stored does not get the memory budget filled with the least bad hits, and one
only loosely related gets a few short messages (real Chroma, real model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import Reservoir
from tests.conftest import make_settings

# A user's chat about baking sourdough bread (topic A), as a gateway stores it.
BAKING = [
    ("user", "My sourdough starter doubled in six hours after I moved it near the oven."),
    ("assistant", "A warm spot speeds up fermentation; around 26 degrees is ideal for a starter."),
    ("user", "I fed it with rye flour this time instead of plain white flour."),
    ("assistant", "Rye is rich in enzymes and wild yeast, so the starter gets more active."),
    ("user", "The crumb of yesterday's loaf was dense and gummy in the middle."),
    ("assistant", "A gummy crumb usually means underproofing or slicing the bread while hot."),
    ("user", "I bake the loaves in a cast iron dutch oven at 250 degrees."),
    ("assistant", "Bake covered for twenty minutes, then uncovered to brown the crust."),
    ("user", "My hydration is 75 percent with a three hour bulk ferment."),
    ("assistant", "At 75 percent hydration, stretch and folds help build dough strength."),
    ("user", "The scoring on top of the loaf keeps tearing instead of opening cleanly."),
    ("assistant", "Score at a shallow angle with a sharp lame, right before it goes in the oven."),
]
FACT = "I fed it with rye flour this time instead of plain white flour."
RELATED = "Which flour did I feed my sourdough starter with?"
# Topic B: nothing stored is about it, yet it shares a word ("hours") with it.
UNRELATED = "How many hours a day should I practise the violin?"
# A short question and a long answer (over 120 tokens) about the same topic.
LONG_QUESTION = "What should I know before buying a stand mixer for bread dough?"
LONG_ANSWER = " ".join(
    ["A stand mixer for bread dough needs a strong motor of at least 500 watts,"]
    + ["a dough hook rather than a flat beater, and a bowl of five litres or more;"] * 8
)
# Related to the bread chat, less than a question about a stored fact: best
# similarity about 0.53 (relevance_full 0.44 by default).
LOOSE = "How do I make pizza dough?"


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def baking(tmp_path: Path) -> Reservoir:
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0))
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in BAKING])
    return engine


async def test_an_unrelated_question_gets_no_semantic_memory(baking: Reservoir) -> None:
    unrelated = await baking.enrich("p", "i", chat(UNRELATED), store=False)
    assert unrelated.semantic.messages == []  # not even its least bad hit
    best = (await baking.search("p", "i", UNRELATED, limit=1))[0].score
    assert best < baking.settings.relevance_floor  # nothing stored is about it

    related = await baking.enrich("p", "i", chat(RELATED), store=False)
    assert FACT in [m.text for m in related.semantic.messages]
    assert len(related.semantic.messages) > 4  # a related question fills the budget
    await baking.close()


async def test_the_floor_holds_across_a_partition(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0, semantic_scope="partition"))
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in BAKING[:6]])
    await engine.add("p", "j", [{"role": r, "content": t} for r, t in BAKING[6:]])
    unrelated = await engine.enrich("p", "k", chat(UNRELATED), store=False)
    assert unrelated.semantic.messages == []
    related = await engine.enrich("p", "k", chat(RELATED), store=False)
    assert FACT in [m.text for m in related.semantic.messages]
    await engine.close()


async def test_without_a_floor_the_budget_is_filled(baking: Reservoir, tmp_path: Path) -> None:
    """`relevance_floor=-1`: the previous behaviour, every hit that fits."""
    await baking.close()
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0, relevance_floor=-1))
    unrelated = await engine.enrich("p", "i", chat(UNRELATED), store=False)
    assert len(unrelated.semantic.messages) > 4
    await engine.close()


async def test_a_loosely_related_question_gets_a_few_short_messages(tmp_path: Path) -> None:
    """Between `relevance_floor` and `relevance_full`: the best hits' short
    messages only (a long answer's short question stands for it), up to
    `relevance_band_tokens`."""
    turns = [*BAKING, ("user", LONG_QUESTION), ("assistant", LONG_ANSWER)]
    band = make_settings(tmp_path, recent_context_size=0, relevance_full=0.9)
    engine = Reservoir(band.model_copy(update={"relevance_band_tokens": 100}))
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in turns])
    best = (await engine.search("p", "i", LOOSE, limit=1))[0].score
    assert band.relevance_floor <= best < band.relevance_full
    loose = await engine.enrich("p", "i", chat(LOOSE), store=False)
    texts = [m.text for m in loose.semantic.messages]
    assert LONG_ANSWER not in texts and LONG_QUESTION in texts
    assert 1 <= len(texts) <= 6  # about 20 tokens each: 100 tokens' worth, not the budget
    assert all(m.tokens < 60 for m in loose.semantic.messages)
    await engine.close()

    # above `relevance_full` (default 0.44), the same question gets all that fits
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0))
    full = await engine.enrich("p", "i", chat(LOOSE), store=False)
    assert LONG_ANSWER in [m.text for m in full.semantic.messages]
    assert len(full.semantic.messages) > 6
    await engine.close()


async def test_a_code_or_name_only_one_message_holds_still_comes_through(
    baking: Reservoir,
) -> None:
    receipt = "The oven repair invoice number is 88213407, paid on the spot."
    await baking.add("p", "i", [{"role": "user", "content": receipt}])
    coded = await baking.enrich("p", "i", chat("What was 88213407 about?"), store=False)
    best = (await baking.search("p", "i", "What was 88213407 about?", limit=1))[0].score
    assert best < baking.settings.relevance_floor  # the dense model reads the code poorly
    assert [m.text for m in coded.semantic.messages] == [receipt]  # alone, not the budget
    # a name nothing stored holds: still nothing
    named = await baking.enrich("p", "i", chat("How is Theodora doing in Vienna?"), store=False)
    assert named.semantic.messages == []
