"""`relevance_floor`: a question unrelated to everything stored does not get
the memory budget filled with the least bad hits (real Chroma, real model)."""

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


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def baking(tmp_path: Path) -> Reservoir:
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0))
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in BAKING])
    return engine


async def test_an_unrelated_question_gets_almost_no_semantic_memory(baking: Reservoir) -> None:
    unrelated = await baking.enrich("p", "i", chat(UNRELATED), store=False)
    assert len(unrelated.semantic.messages) <= 1  # its best hit alone, not the budget
    assert unrelated.semantic.tokens <= 40
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
    assert len(unrelated.semantic.messages) <= 1
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
