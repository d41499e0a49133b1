"""The `Reservoir` engine without HTTP: ids, search, synapses, pairing, deletion, plugins."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import MessageRecord, Reservoir, ReservoirSettings, Scope, hookimpl
from reservoir_middleware.context import ContextPlan, TokenBudget
from reservoir_middleware.hookspecs import documented_hooks
from reservoir_middleware.store import EmbeddingMismatch
from tests.blocks import unblocked
from tests.conftest import make_settings

CONVERSATION = [
    ("user", "I just adopted a rescue greyhound named Comet."),
    ("assistant", "Congratulations on adopting Comet!"),
    ("user", "My favourite food is spicy Sichuan noodles."),
    ("assistant", "Sichuan noodles are delicious."),
    ("user", "I am training for the Berlin marathon in September."),
    ("assistant", "Good luck with the marathon training."),
]


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def reservoir(tmp_path: Path) -> Reservoir:
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0))
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in CONVERSATION])
    return engine


async def test_semantic_search_ranks_the_related_message_first(reservoir: Reservoir) -> None:
    hits = await reservoir.search("p", "i", "What kind of dog do I have?", limit=3)
    assert hits[0].record.text == CONVERSATION[0][1]
    assert hits[0].score > hits[-1].score


async def test_keyword_search_is_ranked_and_case_insensitive(reservoir: Reservoir) -> None:
    hits = await reservoir.search("p", "i", "marathon BERLIN", semantic=False)
    assert [h.record.text for h in hits][:2] == [CONVERSATION[4][1], CONVERSATION[5][1]]
    assert hits[0].score > hits[1].score
    assert await reservoir.search("p", "i", "kangaroo", semantic=False) == []


async def test_enrich_injects_the_hit_with_its_answer_and_reports_it(reservoir: Reservoir) -> None:
    result = await reservoir.enrich("p", "i", chat("Which race am I preparing for?"), store=False)
    texts = [m.text for m in result.semantic.messages]
    assert texts.index(CONVERSATION[4][1]) + 1 == texts.index(CONVERSATION[5][1])
    hit = next(m for m in result.semantic.messages if m.text == CONVERSATION[4][1])
    assert hit.similarity is not None and hit.similarity > 0.3
    assert all(m.tokens > 0 for m in result.semantic.messages)
    assert unblocked(result.body["messages"][-1]) == {
        "role": "user",
        "content": "Which race am I preparing for?",
    }
    assert await reservoir.recent("p", "i", limit=100) == await reservoir.recent(
        "p", "i"
    )  # no write


async def test_min_similarity_and_semantic_size(tmp_path: Path) -> None:
    engine = Reservoir(
        make_settings(
            tmp_path,
            recent_context_size=0,
            semantic_context_size=1,
            pair_answers=False,
            synapse_neighbours=0,
            context_token_budget=None,  # with a budget, the hits fill it instead
        )
    )
    await engine.add("p", "i", [{"role": r, "content": t} for r, t in CONVERSATION])
    result = await engine.enrich("p", "i", chat("greyhound"), store=False)
    assert [m.text for m in result.semantic.messages] == [CONVERSATION[0][1]]
    # min_similarity is a floor for the dense (cosine) candidates only
    strict = Reservoir(make_settings(tmp_path, min_similarity=0.99, disable_plugins="lexical"))
    none = await strict.enrich("p", "i", chat("greyhound"), store=False)
    assert none.semantic.messages == []
    lexical = Reservoir(make_settings(tmp_path, min_similarity=0.99, recent_context_size=0))
    by_word = await lexical.enrich("p", "i", chat("greyhound"), store=False)
    hit, answer = by_word.semantic.messages  # BM25 found the word; the answer came along
    assert (hit.text, hit.similarity, answer.text) == (CONVERSATION[0][1], None, CONVERSATION[1][1])


async def test_content_chained_ids(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path))
    first = await engine.add(
        "p", "i", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]
    )
    again = await engine.add(
        "p",
        "i",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "ok"},
        ],
    )
    assert len(first) == 2 and len(again) == 2  # history re-sent: only the new pair
    other_scope = await engine.add("p", "j", [{"role": "user", "content": "Hi"}])
    assert other_scope[0] not in first
    stored = await engine.recent("p", "i", limit=10)
    assert [r.text for r in stored] == ["Hi", "ok", "Thanks", "ok"]
    assert stored[3].prev_id == stored[2].id and stored[1].prev_id == stored[0].id


async def test_synapses_link_consecutive_similar_messages(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, recent_context_size=0, pair_answers=False))
    await engine.add(
        "p",
        "i",
        [
            {"role": "user", "content": "The quarterly budget review meeting is on Friday at 10."},
            {
                "role": "user",
                "content": "The quarterly budget review meeting is on Friday at 10am.",
            },
            {"role": "user", "content": "Penguins live mostly in the southern hemisphere."},
        ],
    )
    stored = await engine.recent("p", "i")
    assert stored[1].synapse_prev == stored[0].id
    assert stored[2].synapse_prev is None
    result = await engine.enrich("p", "i", chat("When is the budget review?"), store=False)
    texts = [m.text for m in result.semantic.messages]
    assert stored[0].text in texts and stored[1].text in texts


async def test_delete_forgets_a_scope_or_a_partition(reservoir: Reservoir) -> None:
    await reservoir.add("p", "j", [{"role": "user", "content": "Comet is my greyhound."}])
    await reservoir.add("q", "i", [{"role": "user", "content": "Comet is my greyhound."}])
    assert await reservoir.delete("p", "i") == 1
    assert await reservoir.recent("p", "i") == []
    assert await reservoir.search("p", "i", "greyhound") == []
    result = await reservoir.enrich("p", "i", chat("my dog?"), store=False)
    assert not result.semantic.messages and not result.recent.messages
    assert await reservoir.delete("p") == 1  # the remaining instance j
    assert await reservoir.recent("p", "j") == []
    assert len(await reservoir.recent("q", "i")) == 1


async def test_embedding_model_mismatch_names_the_replay_command(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path))
    await engine.add("p", "i", [{"role": "user", "content": "hello"}])

    class OtherModel:
        def __call__(self, input: list[str]) -> list[list[float]]:
            return [[1.0] * 384 for _ in input]

        @staticmethod
        def name() -> str:
            return "other-model"

    other = Reservoir(make_settings(tmp_path, embedding=OtherModel()))
    with pytest.raises(EmbeddingMismatch, match="reservoir replay --embedding other-model"):
        await other.search("p", "i", "hello")


class Redactor:
    name = "redactor"

    @hookimpl
    def reservoir_prepare_record(self, record: MessageRecord) -> MessageRecord | bool | None:
        if "DROP" in record.text:
            return False
        if "secret" in record.text:
            record.text = record.text.replace("hunter2", "[redacted]")
            return record
        return None


class Tagger:
    name = "tagger"

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.deleted: list[Scope] = []
        self.stored: list[int] = []

    @hookimpl
    def reservoir_rewrite_request(self, body: dict[str, Any], scope: Scope) -> dict[str, Any]:
        self.seen.append(str(scope))
        return {
            **body,
            "messages": [
                *body["messages"][:-1],
                {"role": "user", "content": body["messages"][-1]["content"] + " (tagged)"},
            ],
        }

    @hookimpl
    async def reservoir_store(
        self, scope: Scope, records: list[MessageRecord], embeddings: list[list[float]]
    ) -> None:
        self.stored.extend(len(e) for e in embeddings)

    @hookimpl
    def reservoir_delete(self, scope: Scope) -> None:
        self.deleted.append(scope)


class KeepOnlySystem:
    name = "keep-only-system"

    @hookimpl(tryfirst=True)
    def reservoir_truncate(self, plan: ContextPlan, budget: TokenBudget) -> ContextPlan | None:
        if budget.model != "minimal":
            return None  # leave the decision to the built-in truncation
        return ContextPlan(plan.system, [], [], plan.conversation[-1:])


async def test_plugins_given_in_code_take_part(tmp_path: Path) -> None:
    tagger = Tagger()
    engine = Reservoir(make_settings(tmp_path), plugins=[Redactor(), tagger, KeepOnlySystem()])
    result = await engine.enrich("p", "i", chat("my password is secret hunter2"))
    await engine.settle()
    assert result.body["messages"][-1]["content"].endswith("(tagged)")
    assert tagger.seen == ["p/i"]
    stored = await engine.recent("p", "i")
    assert [r.text for r in stored] == ["my password is secret [redacted] (tagged)"]
    assert tagger.stored == [384]
    await engine.add("p", "i", [{"role": "user", "content": "DROP this one"}])
    assert len(await engine.recent("p", "i")) == 1
    minimal = await engine.enrich(
        "p",
        "i",
        {
            "model": "minimal",
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
        },
        store=False,
    )
    assert minimal.body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "c (tagged)"},
    ]
    await engine.delete("p", "i")
    assert tagger.deleted == [Scope("p", "i")]


async def test_disabled_plugins_are_blocked(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, disable_plugins="semantic, lexical, recent"))
    names = [name for name, _ in engine.hooks.describe()]
    assert not {"semantic", "lexical", "recent"} & set(names) and "chroma-store" in names
    await engine.add("p", "i", [{"role": "user", "content": "I love tea."}])
    result = await engine.enrich("p", "i", chat("What do I love?"), store=False)
    assert result.body["messages"] == [{"role": "user", "content": "What do I love?"}]


def test_every_hook_is_documented() -> None:
    hooks = documented_hooks()
    assert set(hooks) == {
        "reservoir_rewrite_request",
        "reservoir_prepare_record",
        "reservoir_store",
        "reservoir_retrieve",
        "reservoir_truncate",
        "reservoir_delete",
        "reservoir_authorize",
        "reservoir_prefetch",
        "reservoir_preload",
        "reservoir_keyword_search",
    }
    for name, doc in hooks.items():
        assert "Return" in doc or "return" in doc, name
        assert "None" in doc or "ignored" in doc, name


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "reservoir.toml"
    config.write_text("recent_context_size = 3\nsemantic_context_size = 4\nmin_similarity = 0.5\n")
    monkeypatch.setenv("RSV_CONFIG_FILE", str(config))
    monkeypatch.setenv("RSV_SEMANTIC_CONTEXT_SIZE", "5")
    monkeypatch.setenv("RSV_DISABLE_PLUGINS", "a,b")
    monkeypatch.setenv("RSV_MODEL_LIMITS", '{"my-model": 4096}')
    settings = ReservoirSettings(min_similarity=0.7)
    assert settings.recent_context_size == 3  # file
    assert settings.semantic_context_size == 5  # env beats file
    assert settings.min_similarity == 0.7  # keyword beats everything
    assert settings.disable_plugins == ["a", "b"]
    assert settings.model_limits == {"my-model": 4096}
    assert ReservoirSettings().context_token_budget == 2000  # default
    with pytest.raises(ValueError, match="semantic_scope"):
        ReservoirSettings(semantic_scope="everything")


async def test_partition_semantic_scope_searches_sibling_instances_only(tmp_path: Path) -> None:
    engine = Reservoir(make_settings(tmp_path, semantic_scope="partition", recent_context_size=0))
    await engine.add(
        "team", "laptop", [{"role": "user", "content": "The wifi password is on the fridge."}]
    )
    await engine.add(
        "other", "laptop", [{"role": "user", "content": "The wifi password is in the drawer."}]
    )
    result = await engine.enrich("team", "phone", chat("Where is the wifi password?"), store=False)
    texts = [m.text for m in result.semantic.messages]
    assert texts == ["The wifi password is on the fridge."]
    narrow = Reservoir(make_settings(tmp_path, recent_context_size=0))
    alone = await narrow.enrich("team", "phone", chat("Where is the wifi password?"), store=False)
    assert alone.semantic.messages == []


async def test_a_scope_deleted_by_another_engine_is_recreated_cleanly(tmp_path: Path) -> None:
    gateway = Reservoir(make_settings(tmp_path))
    admin = Reservoir(make_settings(tmp_path))  # e.g. the CLI, on the same directory
    await gateway.add("p", "i", [{"role": "user", "content": "old secret"}])
    assert len(await gateway.recent("p", "i")) == 1
    assert await admin.delete("p", "i") == 1
    await gateway.add("p", "i", [{"role": "user", "content": "fresh start"}])
    stored = await gateway.recent("p", "i")
    assert [(r.text, r.seq) for r in stored] == [("fresh start", 0)]
    assert [h.record.text for h in await gateway.search("p", "i", "secret")] == ["fresh start"]


async def test_messages_in_flight_are_shown_redacted(tmp_path: Path) -> None:
    """Before a request's messages are written, the next request's recent window
    already shows them, but only as the record filters (redaction) leave them."""
    engine = Reservoir(make_settings(tmp_path), plugins=[Redactor()])
    first = await engine.enrich("p", "i", chat("my secret is hunter2"), store="with_answer")
    second = await engine.enrich("p", "i", chat("what did I say?"), store=False)
    shown = [m.text for m in second.recent.messages]
    assert shown == ["my secret is [redacted]"]
    engine.record_answer(first, None)
    await engine.settle()
    assert [r.text for r in await engine.recent("p", "i")] == ["my secret is [redacted]"]


async def test_added_messages_keep_their_original_time(tmp_path: Path) -> None:
    """An imported conversation keeps its dates: per message, per call, or now."""
    settings = make_settings(tmp_path)
    memory = Reservoir(settings)
    session = [
        {"role": "user", "content": "We planted the apple tree today."},
        {"role": "assistant", "content": "Lovely, apple trees take a few years to fruit."},
    ]
    await memory.add("p", "old", session, timestamp="2023-05-20T15:08:00Z")
    dated = [{"role": "user", "content": "The tree has its first apple!", "timestamp": 1.7e9}]
    await memory.add("p", "old", dated, timestamp=datetime(2020, 1, 1))
    await memory.add("p", "old", [{"role": "user", "content": "Apples for dinner tonight."}])
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        await memory.add("p", "old", [{"role": "user", "content": "never"}], timestamp="May 5")
    await memory.close()

    again = Reservoir(settings)  # read back from the store, not from this process's copy
    times = {r.text: r.timestamp for r in await again.recent("p", "old", limit=10)}
    await again.close()
    may_20 = datetime(2023, 5, 20, 15, 8, tzinfo=timezone.utc).timestamp()
    assert times["We planted the apple tree today."] == may_20
    assert times["Lovely, apple trees take a few years to fruit."] == may_20
    assert times["The tree has its first apple!"] == 1.7e9  # its own time wins
    assert abs(times["Apples for dinner tonight."] - time.time()) < 120
    assert "never" not in times  # a bad time stores nothing of that call
