"""Hybrid retrieval (dense + the built-in "lexical" BM25 plugin) and filling the
memory budget, on the real engine: embedded Chroma (or a `chroma run` server)
and the real embedding model."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import MessageRecord, Reservoir, Scope
from reservoir_middleware.builtins.lexical import Bm25Index, LexicalRetrieval
from reservoir_middleware.builtins.truncation import fill_budget
from reservoir_middleware.context import (
    MEMORY_CLOSE,
    MEMORY_OPEN,
    RECENT_NOTE,
    SEMANTIC_NOTE,
    Candidate,
    ContextPlan,
    MemoryUnit,
    TokenBudget,
    day_line,
    memory_day,
)
from reservoir_middleware.memory._selection import RRF_K, fuse
from reservoir_middleware.memory.keywords import stem, terms
from reservoir_middleware.memory.tokens import count_message, count_text
from tests.blocks import memory_of
from tests.conftest import make_settings

# Everyday messages, and one whose only link to the question is a rare word.
CHATTER = [
    "I went for a long walk by the lake this morning.",
    "My sister is visiting next weekend with her two kids.",
    "The new coffee machine at work makes terrible espresso.",
    "I finally finished reading that novel about the lighthouse keeper.",
    "We are thinking about repainting the kitchen a pale green.",
    "The train was delayed again, forty minutes this time.",
    "I signed up for a pottery class on Thursday evenings.",
    "Our neighbour's dog barks every time the mail arrives.",
    "I need to renew my passport before the trip in spring.",
    "The tomatoes in the garden are finally turning red.",
    "My back hurts after moving all those boxes yesterday.",
    "I tried a new recipe for lentil soup and it was great.",
]
RARE = "The new wifi password is gerbil-paprika-42."
RARE_QUESTION = "And paprika, anything I should know before the weekend trip?"


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def users(texts: list[str]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": t} for t in texts]


def lexical_of(engine: Reservoir) -> LexicalRetrieval:
    plugin = engine.plugin_manager.get_plugin("lexical")
    assert isinstance(plugin, LexicalRetrieval)
    return plugin


async def until(predicate: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- the tokenizer and the index ---------------------------------------------------


def test_one_tokenizer_with_light_stemming() -> None:
    assert terms("Caroline's paintings, PAINTED and painting!") == ["carolin"] + ["paint"] * 3
    assert [stem(w) for w in ("running", "studies", "studied", "boxes", "box", "classes")] == [
        "run",
        "study",
        "study",
        "box",
        "box",
        "class",
    ]
    assert stem("falling") == "fall" and stem("hiking") == stem("hike") == stem("hiked")
    # stop words, single letters; accents of Latin letters folded
    assert terms("the a of to and 42 x é été") == ["42", "ete"]


def test_vectorised_bm25_equals_the_formula() -> None:
    docs = [
        ("a", "apples and pears"),
        ("b", "apples apples apples"),
        ("c", "pears only here, and a very long tail of other words indeed"),
        ("d", "nothing relevant"),
    ]
    index = Bm25Index(neighbour_weight=0.0)  # each message keyed by its own words only
    assert index.add(docs) == 4
    assert index.add(docs[:1]) == 0  # the same id twice is indexed once
    query = terms("apples pears")
    bags = {i: Counter(terms(t)) for i, t in docs}
    avg = sum(sum(b.values()) for b in bags.values()) / len(bags)

    def expected(doc: str) -> float:
        score = 0.0
        for term in set(query):
            df = sum(1 for b in bags.values() if term in b)
            tf = bags[doc][term]
            if tf:
                idf = math.log(1 + (len(bags) - df + 0.5) / (df + 0.5))
                norm = 1.2 * (1 - 0.75 + 0.75 * sum(bags[doc].values()) / avg)
                score += idf * tf * 2.2 / (tf + norm)
        return score

    top = index.top(query, 10)
    assert [i for i, _ in top] == sorted("abc", key=expected, reverse=True)
    for doc, score in top:
        assert score == pytest.approx(expected(doc), rel=1e-5)
    assert index.top(query, 1) == top[:1]
    assert index.top(terms("kiwi"), 10) == []


def test_fusion_is_reciprocal_rank() -> None:
    def record(name: str) -> MessageRecord:
        return MessageRecord(id=name, partition="p", instance="i", role="user", text=name)

    def ranked(names: str, source: str) -> list[Candidate]:
        n = len(names)
        return [Candidate(record(x), "semantic", float(n - i), source) for i, x in enumerate(names)]

    hits = fuse([("semantic", ranked("xyz", "semantic")), ("lexical", ranked("wzx", "lexical"))])
    # x: 1/61 + 1/63, z: 1/63 + 1/62, w: 1/61, y: 1/62
    assert [h.record.id for h in hits] == ["x", "z", "w", "y"]
    assert hits[0].score == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 3))
    assert hits[0].similarity == 3.0 and hits[2].similarity is None  # cosine only from dense


# -- hybrid retrieval in the engine -------------------------------------------------


@pytest.fixture
async def filled(tmp_path: Path) -> Path:
    engine = Reservoir(make_settings(tmp_path))
    await engine.add("p", "i", users([*CHATTER[:6], RARE, *CHATTER[6:]]))
    return tmp_path


async def test_lexical_finds_a_rare_word_the_dense_model_misses(filled: Path) -> None:
    dense_only = Reservoir(make_settings(filled, disable_plugins="lexical", recent_context_size=0))
    dense = await dense_only.search("p", "i", RARE_QUESTION, limit=20)
    similarity = next(h.score for h in dense if h.record.text == RARE)
    assert similarity < dense_only.settings.min_similarity  # the premise: dense misses it
    missed = await dense_only.enrich("p", "i", chat(RARE_QUESTION), store=False)
    assert missed.semantic.messages and RARE not in [m.text for m in missed.semantic.messages]

    hybrid = Reservoir(make_settings(filled, recent_context_size=0))
    found = await hybrid.enrich("p", "i", chat(RARE_QUESTION), store=False)
    hit = next(m for m in found.semantic.messages if m.text == RARE)
    assert hit.similarity is None  # proposed by BM25 alone
    assert f"user: {RARE}" in memory_of(found.body["messages"])


async def test_a_message_both_retrievers_rank_comes_first(filled: Path) -> None:
    engine = Reservoir(make_settings(filled, recent_context_size=0))
    question = "What is the new wifi password?"
    result = await engine.enrich("p", "i", chat(question), store=False)
    report = result.semantic.messages  # best unit first
    assert report[0].text == RARE and report[0].similarity is not None  # dense and BM25
    lexical = lexical_of(engine).index(Scope("p", "i"), engine.store)
    assert lexical is not None
    best = lexical.top(terms(question), 3)
    assert best[0][1] > best[1][1]  # BM25 ranks it first too
    dense = await engine.search("p", "i", question, limit=3)
    assert dense[0].record.text == RARE


async def test_disabling_lexical_restores_dense_only(filled: Path) -> None:
    engine = Reservoir(make_settings(filled, disable_plugins="lexical", recent_context_size=0))
    assert "lexical" not in [name for name, _ in engine.hooks.describe()]
    result = await engine.enrich("p", "i", chat("What am I growing at home?"), store=False)
    dense = await engine.search("p", "i", "What am I growing at home?", limit=30)
    wanted = [h.record.text for h in dense if h.score >= engine.settings.min_similarity]
    assert [m.text for m in result.semantic.messages] == wanted[: len(result.semantic.messages)]
    assert all(m.similarity is not None for m in result.semantic.messages)


async def test_index_follows_writes_and_forgets_deleted_scopes(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, disable_plugins="semantic", recent_context_size=0))
    lexical = lexical_of(engine)
    await engine.add("p", "i", users(CHATTER))
    nothing = await engine.enrich("p", "i", chat("zanzibar"), store=False)  # builds the index
    assert nothing.semantic.messages == []
    index = lexical.index(Scope("p", "i"), engine.store)
    assert index is not None and len(index) == len(CHATTER)

    await engine.add("p", "i", users(["We booked the ferry to Zanzibar."]))
    assert len(index) == len(CHATTER) + 1  # through the plugin's own store hook
    found = await engine.enrich("p", "i", chat("zanzibar"), store=False)
    # first; the message before it follows, keyed with its neighbour's words
    assert [m.text for m in found.semantic.messages][:2] == [
        "We booked the ferry to Zanzibar.",
        CHATTER[-1],
    ]

    admin = Reservoir(make_settings(tmp_path))  # another engine (the CLI) deletes the scope
    await admin.delete("p", "i")
    stale = await engine.enrich("p", "i", chat("zanzibar"), store=False)
    assert stale.semantic.messages == [] and not stale.degraded  # gone from the store: left out

    await engine.delete("p", "i")
    assert lexical.index(Scope("p", "i"), engine.store) is not index  # dropped, rebuilt empty
    gone = await engine.enrich("p", "i", chat("zanzibar"), store=False)
    assert gone.semantic.messages == []
    await engine.add("p", "i", users(["Zanzibar again, after the deletion."]))
    again = await engine.enrich("p", "i", chat("zanzibar"), store=False)
    assert [m.text for m in again.semantic.messages] == ["Zanzibar again, after the deletion."]


async def test_a_large_scope_is_indexed_in_the_background(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, disable_plugins="semantic", recent_context_size=0))
    lexical = lexical_of(engine)
    lexical.blocking_build = 5  # "large" is anything above 5 messages here
    await engine.add("p", "i", users([*CHATTER, RARE]))
    first = await engine.enrich("p", "i", chat("paprika"), store=False)
    assert first.semantic.messages == [] and not first.degraded  # not ready: no candidates

    async def ready() -> bool:
        result = await engine.enrich("p", "i", chat("paprika"), store=False)
        return [m.text for m in result.semantic.messages][:1] == [RARE]  # then its neighbour

    await until(ready)


async def test_partition_scope_searches_every_instance_lexically(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, semantic_scope="partition", disable_plugins="semantic", recent_context_size=0
    )
    engine = Reservoir(settings)
    await engine.add("team", "laptop", users(["The router admin page is at 192.168.8.1."]))
    await engine.add("other", "laptop", users(["Our router admin page is at 10.0.0.138."]))
    result = await engine.enrich("team", "phone", chat("router admin page?"), store=False)
    assert [m.text for m in result.semantic.messages] == [
        "The router admin page is at 192.168.8.1."
    ]


async def test_server_mode_refreshes_an_index_another_process_made_stale(
    tmp_path: Path, chroma_server: str
) -> None:
    partition = f"lexical-{tmp_path.name}"
    settings = make_settings(
        tmp_path, chroma_url=chroma_server, disable_plugins="semantic", recent_context_size=0
    )
    reader, writer = Reservoir(settings), Reservoir(settings)  # e.g. two gateway workers
    await writer.add(partition, "i", users(CHATTER))
    empty = await reader.enrich(partition, "i", chat("zanzibar"), store=False)
    assert empty.semantic.messages == []  # the reader's index is built, without Zanzibar
    await writer.add(partition, "i", users(["We booked the ferry to Zanzibar."]))
    lexical_of(reader).refresh_s = 0.0  # compare counts on every request (default: 5 s)

    async def refreshed() -> bool:
        result = await reader.enrich(partition, "i", chat("zanzibar"), store=False)
        found = [m.text for m in result.semantic.messages]
        return found[:1] == ["We booked the ferry to Zanzibar."]  # then its neighbour

    await until(refreshed)
    await writer.delete(partition)


# -- filling the budget -------------------------------------------------------------------


VEGETABLES = [
    *("carrots", "leeks", "beans", "peas", "kale", "onions", "beetroot", "radishes"),
    *("spinach", "garlic", "potatoes", "courgettes", "lettuce", "chard", "fennel", "celery"),
]
GARDEN = [
    f"Garden note {n}: the tomato plants in bed {n} need water and stakes." for n in range(40)
]


async def test_hits_fill_the_budget_instead_of_a_fixed_count(tmp_path: Path) -> None:
    alone = {"recent_context_size": 0, "synapse_neighbours": 0}  # the notes are near twins
    settings = make_settings(tmp_path, **alone)
    engine = Reservoir(settings)
    await engine.add("p", "i", users(GARDEN))
    question = chat("Which tomato plants need water?")
    roomy = await engine.enrich("p", "i", question, store=False)  # default budget: 2000
    assert len(roomy.semantic.messages) > settings.semantic_context_size
    assert roomy.semantic.tokens <= 2000

    tight = Reservoir(make_settings(tmp_path, **alone, context_token_budget=120))
    few = await tight.enrich("p", "i", question, store=False)
    assert 0 < len(few.semantic.messages) < settings.semantic_context_size
    assert few.semantic.tokens + 20 <= 120  # the note counts too

    counted = Reservoir(make_settings(tmp_path, **alone, context_token_budget=None))
    # no budget: semantic_context_size is the count
    seven = await counted.enrich("p", "i", question, store=False)
    assert len(seven.semantic.messages) == settings.semantic_context_size

    old = Reservoir(make_settings(tmp_path, **alone, fill_budget=False))
    top = await old.enrich("p", "i", question, store=False)
    assert len(top.semantic.messages) == settings.semantic_context_size


async def test_the_recent_window_takes_at_most_its_share(tmp_path: Path) -> None:
    chatter = [f"{text} (message {n})" for n, text in enumerate(CHATTER + CHATTER)]
    settings = make_settings(tmp_path, context_token_budget=400, recent_context_size=15)
    engine = Reservoir(settings)  # recent_budget_share 0.25: at most 100 tokens
    await engine.add("p", "i", users([*GARDEN[:20], *chatter]))
    window = [r.text for r in await engine.recent("p", "i", limit=15)]
    result = await engine.enrich("p", "i", chat("Which tomato plants need water?"), store=False)
    recent = [m.text for m in result.recent.messages]
    note = count_message({"role": "system", "content": RECENT_NOTE}, "gpt-4o")
    assert recent and recent == window[-len(recent) :]  # the newest ones, in order
    assert result.recent.tokens + note <= 100 < result.recent.tokens + note + 40
    assert result.semantic.tokens > 200  # the rest went to semantic memory

    whole = Reservoir(make_settings(tmp_path, context_token_budget=400, recent_budget_share=1.0))
    before = await whole.enrich("p", "i", chat("Which tomato plants need water?"), store=False)
    assert len(before.recent.messages) > len(recent)  # the old order: recent first

    # with nothing retrieved, the older recent messages take the room that is left
    quiet = Reservoir(make_settings(tmp_path, context_token_budget=400, semantic_context_size=0))
    alone = await quiet.enrich("p", "i", chat("Which tomato plants need water?"), store=False)
    assert len(alone.recent.messages) > len(recent) and alone.recent.tokens <= 400


async def test_the_recent_share_fades_when_the_conversation_is_days_old(tmp_path: Path) -> None:
    """Picked up days later, a conversation's last turns no longer take a quarter of
    the budget ahead of what the question is about; they get what is left."""
    chatter = [f"{text} (message {n})" for n, text in enumerate(CHATTER + CHATTER)]
    budget = {"context_token_budget": 400, "recent_context_size": 15}
    question = chat("Which tomato plants need water?")
    days_ago = time.time() - 3 * 86400
    stale = Reservoir(make_settings(tmp_path / "stale", **budget))
    await stale.add("p", "i", users([*GARDEN[:20], *chatter]), timestamp=days_ago)
    picked_up = await stale.enrich("p", "i", question, store=False)
    fresh = Reservoir(make_settings(tmp_path / "fresh", **budget))
    await fresh.add("p", "i", users([*GARDEN[:20], *chatter]))
    going_on = await fresh.enrich("p", "i", question, store=False)
    assert going_on.recent.tokens > 60  # its share: up to 100 tokens
    assert picked_up.recent.tokens < going_on.recent.tokens
    garden = [m for m in picked_up.semantic.messages if "tomato" in m.text]
    assert len(garden) > len([m for m in going_on.semantic.messages if "tomato" in m.text])

    # a day or more old: no share at all; `recent_fade_hours=0` keeps the share
    assert stale._requests.recent_share(await stale.recent("p", "i")) == 0.0
    await stale.close()
    await fresh.close()
    steady = Reservoir(make_settings(tmp_path / "stale", **budget, recent_fade_hours=0))
    kept = await steady.enrich("p", "i", question, store=False)
    assert kept.recent.tokens == going_on.recent.tokens
    await steady.close()


async def test_a_long_answer_waits_until_the_short_hits_are_in(tmp_path: Path) -> None:
    """A 300-token answer brought along by a hit would crowd out the other
    relevant short turns; over `long_message_tokens` it waits for them."""
    long_answer = "Here is a long plan for the vegetable garden. " + " ".join(
        f"In week {n}, water every bed in the morning, weed the paths and check the slugs."
        for n in range(14)
    )
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What did I plant in the vegetable garden last year?"},
        {"role": "assistant", "content": long_answer},
    ]
    messages += users([f"I planted {veg} in the vegetable garden." for veg in VEGETABLES])
    alone = {
        "recent_context_size": 0,
        "synapse_neighbours": 0,
        "context_token_budget": 450,
        "semantic_context_size": 20,  # every hit brings its answer
    }
    question = chat("What did I plant in the vegetable garden?")
    waits = Reservoir(make_settings(tmp_path, **alone))
    await waits.add("p", "i", messages)
    result = await waits.enrich("p", "i", question, store=False)
    await waits.close()
    crowds = Reservoir(make_settings(tmp_path, **alone, long_message_tokens=0))
    before = await crowds.enrich("p", "i", question, store=False)
    await crowds.close()

    def planted(found: Any) -> int:
        return sum(1 for m in found.semantic.messages if m.text.startswith("I planted"))

    assert long_answer in [m.text for m in before.semantic.messages]  # it took the room
    assert long_answer not in [m.text for m in result.semantic.messages]  # too long to wait for
    assert planted(result) == len(VEGETABLES) > planted(before)


async def test_answers_come_with_the_best_hits_and_give_way_under_a_tight_budget(
    tmp_path: Path,
) -> None:
    exchanges = []
    for n in range(10):
        exchanges += [
            {"role": "user", "content": f"What should I plant in bed {n} of the vegetable garden?"},
            {"role": "assistant", "content": f"Sure thing, reminder number {n} is saved."},
        ]
    alone = {
        "recent_context_size": 0,
        "synapse_neighbours": 0,
        "semantic_context_size": 2,
        "lexical_neighbour_weight": 0.0,  # the answers are found as pairs only, not as hits
    }
    engine = Reservoir(make_settings(tmp_path, **alone))
    await engine.add("p", "i", exchanges)
    question = chat("What should I plant in the vegetable garden?")
    result = await engine.enrich("p", "i", question, store=False)
    report = result.semantic.messages  # unit by unit, best first
    # the 2 best hits (semantic_context_size) bring their answers; the later ones come alone
    assert [m.role for m in report[:4]] == ["user", "assistant", "user", "assistant"]
    assert len(report) > 4 and {m.role for m in report[4:]} == {"user"}

    def line(role: str, text: str) -> int:  # one line of the block
        return count_text(f"{role}:", "gpt-4o") + count_text(text, "gpt-4o") + 1

    q = line("user", exchanges[0]["content"])
    a = line("assistant", exchanges[1]["content"])
    frame = count_text(MEMORY_OPEN, "gpt-4o") + count_text(MEMORY_CLOSE, "gpt-4o") + 3
    note = count_text(SEMANTIC_NOTE, "gpt-4o") + 1
    today = memory_day(MessageRecord("x", "p", "i", "user", ""))
    day = count_text(day_line(today, year_shown=False), "gpt-4o") + 1
    # the best unit, one more hit, not its answer
    budget = frame + note + day + q + a + q + min(q, a) - 1
    tight = Reservoir(make_settings(tmp_path, **alone, context_token_budget=budget))
    squeezed = await tight.enrich("p", "i", question, store=False)
    kept = squeezed.semantic.messages
    assert [m.role for m in kept] == ["user", "assistant", "user"]
    assert kept[:2] == report[:2] and kept[2] == report[2]  # the answer gave way, not the hit


# -- the fill order, exactly (a word counter as the token counter) --------------------------


def _unit(name: str, score: float, *extras: str) -> MemoryUnit:
    records = [
        MessageRecord(id=x, partition="p", instance="i", role="user", text=x, seq=n)
        for n, x in enumerate((name, *extras))
    ]
    return MemoryUnit(records, score, name)


def _budget(limit: int, share: float = 0.25) -> TokenBudget:
    def tokens(message: dict[str, Any]) -> int:  # a message costs 5 + words: a text, its words
        return 0 if message["role"] == "system" else 5 + len(str(message["content"]).split())

    return TokenBudget(
        model=None,
        input_limit=10_000,
        context_budget=limit,
        count_message=tokens,
        count_messages=lambda ms: sum(tokens(m) for m in ms),
        recent_share=share,
    )


def _recent(*texts: str) -> list[MessageRecord]:
    return [
        MessageRecord(id=t, partition="p", instance="i", role="user", text=t, seq=100 + n)
        for n, t in enumerate(texts)
    ]


def test_fill_order_recent_share_then_hits_and_answers_by_rank_then_older_recent() -> None:
    units = [
        _unit("h1 one", 0.9, "a1 one two"),  # a hit's line ("user: h1 one", 4) and its answer (5)
        _unit("h2 one two", 0.8, "a2 one two three"),  # 5 and 6
        _unit("h3 one", 0.7),  # 4, a hit beyond the paired ones: alone
    ]
    recent = _recent("r1 x x x", "r2 x x", "r3 x")  # oldest first: 6, 5, 4
    plan = ContextPlan([], units, recent, [{"role": "user", "content": "q"}])

    def kept(limit: int, share: float = 0.25) -> tuple[list[str], list[str]]:
        out = fill_budget(plan, _budget(limit, share))
        return [r.id for u in out.semantic for r in u.records], [r.id for r in out.recent]

    everything = ["h1 one", "a1 one two", "h2 one two", "a2 one two three", "h3 one"]
    # 60: the share (15) holds r3 (its line 4, the note 7, a date line 4); the frame
    # (5) is outside it; every unit (34: the note 6 and a date 4 with h1); r2; not r1
    assert kept(60) == (everything, ["r2 x x", "r3 x"])
    # 70: r1 gets the room semantic memory left
    assert kept(70) == (everything, ["r1 x x x", "r2 x x", "r3 x"])
    # 49 at share 0.35 (17): r3, not r2; h1 + a1, h2, then a2 (6) does not fit but h3
    # (4) does: a lower unit's answer gives way first, and a part that does not fit
    # does not stop the fill
    assert kept(49, 0.35) == (["h1 one", "a1 one two", "h2 one two", "h3 one"], ["r3 x"])
    # share 1.0: the old order, the recent window first
    assert kept(31, share=1.0) == ([], ["r1 x x x", "r2 x x", "r3 x"])
    # share 0: memory first, the recent window only gets what is left
    assert kept(45, share=0.0) == (everything, [])


async def test_preload_makes_a_large_scope_searchable_from_its_first_request(
    tmp_path: Path,
) -> None:
    """A scope too large to index on a request is indexed in the background, so
    its first requests miss BM25 candidates; `preload` does that work up front."""
    settings = make_settings(tmp_path, disable_plugins="semantic", recent_context_size=0)
    filler = [f"filler note {n}: the weather was fine and nothing happened" for n in range(1200)]
    writer = Reservoir(settings)
    await writer.add("p", "i", users([*filler, "The ferry to Zanzibar leaves at noon."]))

    cold = Reservoir(settings)
    first = await cold.enrich("p", "i", chat("zanzibar ferry"), store=False)
    assert first.semantic.messages == []  # still indexing in the background

    warm = Reservoir(settings)
    await warm.preload("p", "i")
    found = await warm.enrich("p", "i", chat("zanzibar ferry"), store=False)
    assert [m.text for m in found.semantic.messages][:1] == [
        "The ferry to Zanzibar leaves at noon."
    ]


async def test_a_turn_is_found_by_the_words_of_its_neighbours(tmp_path: Path) -> None:
    """ "Yes, last Saturday!" says nothing by itself: it is keyed with the words
    of the question before it, so a question about the aquarium finds the answer
    (pairing off: found as a hit of its own), while a keyword search still lists
    only the messages that hold the word."""
    settings = make_settings(
        tmp_path,
        disable_plugins="semantic",
        recent_context_size=0,
        pair_answers=False,
        synapse_neighbours=0,
    )
    engine = Reservoir(settings)
    await engine.add("p", "i", users(CHATTER))
    question = "Did you ever take the kids to the aquarium in Lisbon?"
    answer = "Yes, last Saturday! They loved the sea otters."
    await engine.add(
        "p", "i", [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    )
    await engine.add("p", "i", users(["The plumber comes on Monday."]))
    found = await engine.enrich(
        "p", "i", chat("When did we visit the Lisbon aquarium?"), store=False
    )
    texts = [m.text for m in found.semantic.messages]
    assert texts[:2] == [question, answer]
    assert "The plumber comes on Monday." not in texts  # not a neighbour of the question
    keyword = await engine.search("p", "i", "aquarium", semantic=False)
    assert [h.record.text for h in keyword] == [question]
    await engine.close()
