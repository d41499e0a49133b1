"""Dense retrieval sees all of a long message: what the embedding model does not
read of it (past 256 word pieces) is embedded as passages (`memory._passages`),
and the dense search scores a message by the best of its vectors. Real engine,
real embedded Chroma (inline and in the child), the real model."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from reservoir_middleware import MessageRecord, Reservoir, Scope
from reservoir_middleware.memory import _minilm
from reservoir_middleware.memory._passages import MAX_PASSAGES, PASSAGE_PIECES, passages_of, spans
from reservoir_middleware.memory.embeddings import MiniLMEmbedding, OpenAICompatibleEmbedding
from reservoir_middleware.storage import maintenance
from reservoir_middleware.storage._chroma_passages import unmarked
from reservoir_middleware.storage._chroma_rows import passages_name
from reservoir_middleware.storage.chroma import ChromaStore
from tests.conftest import make_settings
from tests.test_deletion import files_holding

GARDEN = [
    "Start the tomato seeds indoors about six weeks before the last expected frost, in small "
    "pots on a sunny windowsill.",
    "Keep the compost moist but never soggy, and turn the pile every week or two so that air "
    "reaches the middle.",
    "Water the beds early in the morning rather than in the evening, so the leaves dry quickly "
    "and mildew has less chance.",
    "A layer of straw mulch around the plants keeps the soil cool, holds moisture and stops "
    "most of the weeds.",
    "Pinch out the side shoots of cordon tomatoes as they appear in the joint between the stem "
    "and a leaf.",
    "Feed the plants with a liquid seaweed fertiliser once the first truss of flowers has set "
    "fruit.",
    "Roses like a deep soak once a week far more than a light sprinkle every day.",
    "Prune the roses in late winter, cutting just above an outward facing bud at a slight angle.",
    "Dead-heading spent flowers keeps many annuals blooming until the first frosts of autumn.",
    "Slugs come out after rain, so a torch-lit walk around the vegetable patch at dusk catches "
    "a surprising number.",
    "Beer traps, copper tape and crushed eggshells each help a little, but none of them is a "
    "complete answer.",
    "Plant marigolds and nasturtiums between the vegetables to draw aphids away and bring in "
    "hoverflies.",
    "Rotate the crops each year so that potatoes and tomatoes do not grow in the same bed two "
    "seasons running.",
    "Beans and peas leave nitrogen in the soil, which the leafy greens that follow them will "
    "appreciate.",
    "Sow lettuce little and often, a short row every two weeks, so that you are never flooded "
    "with heads at once.",
    "Thin the carrot seedlings on a still evening, because the smell of crushed leaves attracts "
    "carrot fly.",
    "Cover young brassicas with fine netting against cabbage white butterflies and pigeons.",
    "Harvest courgettes while they are small and firm; left alone for a week they turn into "
    "marrows.",
    "Raspberry canes that fruited this summer can be cut to the ground once the harvest is over.",
    "Strawberry runners root easily if you pin them into small pots of compost beside the "
    "mother plant.",
    "An old bath or a half barrel sunk into the lawn makes a small wildlife pond in a single "
    "afternoon.",
    "Leave a corner of the garden a little wild, with a log pile, for beetles, hedgehogs and "
    "solitary bees.",
    "Test the soil with a cheap kit from the garden centre before adding lime to the vegetable "
    "beds.",
    "Clay soil improves slowly with plenty of organic matter dug in every autumn, never when it "
    "is wet.",
    "Sandy soil drains fast and warms early in spring, but it needs feeding more often through "
    "the year.",
    "Sharpen the blades of the secateurs and the mower at the end of the season and oil the "
    "moving parts.",
    "Clean the pots and seed trays with hot soapy water in winter so that they are ready for "
    "spring sowing.",
    "A cold frame made from old windows lets you harden off seedlings without moving them in "
    "and out each day.",
    "Garlic planted in late autumn needs the cold of winter to split into a proper bulb of "
    "separate cloves.",
    "Onion sets go in during early spring, with their tips just showing above the surface of "
    "the soil.",
    "Rhubarb crowns can be forced under an upturned bucket for early, tender, pale pink stems.",
    "Apple trees are pruned in winter while dormant, plums only in summer to avoid silver leaf "
    "disease.",
    "Wasps in late summer will go for the windfall fruit, so gather the fallen apples every "
    "morning.",
    "Herbs such as rosemary, thyme and sage prefer poor, dry, well-drained soil and full sun.",
    "Mint spreads everywhere if given the chance, so grow it in a pot sunk into the border.",
    "Basil hates cold nights and wet roots; keep it on the kitchen windowsill until midsummer.",
    "Leaf mould made from autumn leaves in a wire cage becomes a fine crumbly mulch after two "
    "years.",
    "A water butt under every downpipe saves a great deal of tap water during dry spells.",
    "Keep a notebook of what was sown where and when, with the varieties that did well and "
    "those that failed.",
    "Seed catalogues arrive in midwinter, which is the best time to plan next year's beds at "
    "the kitchen table.",
]
FACT = (
    "One last thing before you go: your luggage locker at Bologna Centrale railway station "
    "is number 4471, on the lower level next to the pharmacy, and the key is on the orange "
    "ribbon."
)
QUESTION = "What is the number of my luggage locker at the Bologna train station?"
# About 900 word pieces; the fact is only in its last paragraph.
LONG_ANSWER = "\n\n".join(
    [" ".join(GARDEN[:12]), " ".join(GARDEN[12:26]), " ".join(GARDEN[26:]), FACT]
)
CHATTER = [
    "The train was delayed again, forty minutes this time.",
    "I need to renew my passport before the trip in spring.",
    "We booked a hotel near the old town for three nights.",
    "My suitcase wheel broke on the way to the airport.",
    "The museum is closed on Mondays, so we go on Tuesday.",
    "I lost my umbrella somewhere at the station yesterday.",
]


def word_pieces(text: str) -> int:
    return len(_minilm._splitter().encode(text, add_special_tokens=False).ids)


def conversation() -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for text in CHATTER:
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]
    return [
        *turns,
        {"role": "user", "content": "Any tips for my vegetable garden while I travel?"},
        {"role": "assistant", "content": LONG_ANSWER},
    ]


def test_the_long_answer_is_what_the_model_cannot_read_whole() -> None:
    assert 850 < word_pieces(LONG_ANSWER) < 1000
    assert word_pieces(LONG_ANSWER.split(FACT)[0]) > 3 * _minilm.MAX_TOKENS  # the fact is far


@pytest.mark.parametrize("chroma_process", ["inline", "child"])
async def test_dense_search_finds_a_fact_at_the_end_of_a_long_message(
    tmp_path: Path, chroma_process: str
) -> None:
    settings = make_settings(
        tmp_path,
        chroma_process=chroma_process,
        disable_plugins=["lexical"],  # by embedding only
        recent_context_size=0,  # the answer is retrieved, not recent
    )
    engine = Reservoir(settings)
    try:
        await engine.add("p", "i", conversation())
        hits = await engine.search("p", "i", QUESTION, limit=3)
        assert hits[0].record.text == LONG_ANSWER, [h.record.text[:40] for h in hits]
        assert len({h.record.id for h in hits}) == len(hits)  # each message once
        await engine.preload("p", "i")  # now from the in-memory index
        hits = await engine.search("p", "i", QUESTION, limit=3)
        assert hits[0].record.text == LONG_ANSWER
        assert len({h.record.id for h in hits}) == len(hits)
        result = await engine.enrich(
            "p",
            "i",
            {"model": "gpt-4o", "messages": [{"role": "user", "content": QUESTION}]},
            store=False,
        )
        assert LONG_ANSWER in [m.text for m in result.semantic.messages]
        # passages are no messages: not counted, listed, exported nor found by id
        stored = await engine.recent("p", "i", limit=100)
        assert len(stored) == len(conversation())
        scope = Scope("p", "i")
        assert engine.store.count(scope) == len(conversation())
        exported = [r for page in engine.store.pages(scope) for r, _ in page]
        assert sorted(r.id for r in exported) == sorted(r.id for r in stored)
        documents = engine.store.documents(scope, 0, 100)
        assert sorted(i for i, _ in documents) == sorted(r.id for r in stored)
        (answer,) = [r for r in stored if r.text == LONG_ANSWER]
        assert engine.store.get(scope, [f"{answer.id}#1"]) == []
        assert engine.store.scopes() == [scope]
        assert [s.messages for s in engine.store.scope_stats()] == [len(conversation())]
        if chroma_process == "child":
            assert isinstance(engine.store, ChromaStore) and engine.store.server is not None
            (pieces,) = MiniLMEmbedding().split_passages([LONG_ANSWER])
            texts = {turn["content"] for turn in conversation()}
            assert engine.store.server.embedded == len(texts) + len(pieces)  # passages there too
    finally:
        await engine.close()


@pytest.mark.parametrize("chroma_process", ["inline", "child"])
async def test_deleting_the_scope_leaves_no_trace_of_its_passages(
    tmp_path: Path, chroma_process: str
) -> None:
    """As for the messages (`test_deletion`): their rows, their index files and
    the text they come from are gone, the other scope's passages stay."""
    settings = make_settings(tmp_path, chroma_process=chroma_process)
    data_dir = settings.data_dir
    marker = f"zebra-{secrets.token_hex(6)}"  # only in the part passages cover
    engine = Reservoir(settings)
    gone, stays = Scope("gone", "i"), Scope("stays", "i")
    try:
        answer = f"{LONG_ANSWER} The word is {marker}."
        await engine.add("gone", "i", [{"role": "assistant", "content": answer}])
        other = "\n\n".join([" ".join(GARDEN[26:]), " ".join(GARDEN[:26]), FACT])
        await engine.add("stays", "i", [{"role": "assistant", "content": other}])
        store = engine.store
        assert isinstance(store, ChromaStore)
        passages = store.client.get_collection(passages_name(gone))
        ids = passages.get(include=[])["ids"]
        assert len(ids) >= 3
        segments = segment_dirs(data_dir, str(passages.id))
        assert rows_of(data_dir, ids) > 0 and files_holding(data_dir, marker.encode())
        for _ in range(100):  # (the child's Chroma makes its index files in the background)
            if any(folder.is_dir() for folder in segments):
                break
            await asyncio.sleep(0.1)
        assert any(folder.is_dir() for folder in segments)
        assert await engine.delete("gone") == 1
        names = {c.name for c in store.client.list_collections()}
        assert passages_name(gone) not in names and passages_name(stays) in names
        assert rows_of(data_dir, ids) == 0
        assert not any(folder.exists() for folder in segments)
        assert files_holding(data_dir, marker.encode()) == []
        assert (await engine.search("stays", "i", QUESTION, limit=1))[0].record.text == other
    finally:
        await engine.close()
    assert files_holding(data_dir, marker.encode()) == []


def rows_of(data_dir: Path, ids: list[str]) -> int:
    """Rows of Chroma's database about these ids (its log, its records)."""
    with contextlib.closing(sqlite3.connect(data_dir / "chroma.sqlite3")) as db:
        marks = ",".join("?" * len(ids))
        queued = db.execute(f"SELECT count(*) FROM embeddings_queue WHERE id IN ({marks})", ids)
        kept = db.execute(f"SELECT count(*) FROM embeddings WHERE embedding_id IN ({marks})", ids)
        return int(queued.fetchone()[0]) + int(kept.fetchone()[0])


def segment_dirs(data_dir: Path, collection: str) -> list[Path]:
    """The index directories of a collection (one per segment)."""
    with contextlib.closing(sqlite3.connect(data_dir / "chroma.sqlite3")) as db:
        rows = db.execute("SELECT id FROM segments WHERE collection = ?", (collection,))
        return [data_dir / str(row[0]) for row in rows]


async def test_a_replay_gives_passages_to_a_store_filled_before_them(tmp_path: Path) -> None:
    """A store written before passages existed works as it did (a long message
    has its first vector only); `reservoir replay` with the same model gives
    its long messages their passages, once."""
    settings = make_settings(tmp_path, disable_plugins=["lexical"])
    engine = Reservoir(settings)
    scope = Scope("p", "i")
    try:
        store = engine.store
        assert isinstance(store, ChromaStore)
        turns = conversation()
        records = [
            MessageRecord(
                id=f"m{n}",
                partition="p",
                instance="i",
                role=turn["role"],
                text=turn["content"],
                seq=n,
                embedding_model=engine.embedding_model,
            )
            for n, turn in enumerate(turns)
        ]
        vectors = [[float(x) for x in v] for v in engine.embedder([t["content"] for t in turns])]
        store.reservoir_store(scope, records, vectors)  # as before: no passages
        col = store.collection(scope)
        assert col is not None
        col.modify(metadata=unmarked(col.metadata or {}))  # nor the mark of a scope with them
        store.forget(scope)
        hits = await engine.search("p", "i", QUESTION, limit=3)
        assert hits[0].record.text != LONG_ANSWER  # it works, without passages
        assert len(hits) == 3
        assert await maintenance.replay(store, settings, "minilm") == 1  # the long answer
        assert passages_name(scope) in {c.name for c in store.client.list_collections()}
        hits = await engine.search("p", "i", QUESTION, limit=3)
        assert hits[0].record.text == LONG_ANSWER
        assert await maintenance.replay(store, settings, "minilm") == 0  # done: not again
        assert store.count(scope) == len(turns)
    finally:
        await engine.close()


async def test_an_import_makes_the_passages_an_export_does_not_carry(tmp_path: Path) -> None:
    source = Reservoir(make_settings(tmp_path / "a", disable_plugins=["lexical"]))
    target = Reservoir(make_settings(tmp_path / "b", disable_plugins=["lexical"]))
    try:
        await source.add("p", "i", conversation())
        exported = [
            row for page in source.store.pages(Scope("p", "i"), embeddings=True) for row in page
        ]
        assert all(vector is not None for _, vector in exported)  # reused, not recomputed
        assert await target.import_records(exported) == (len(exported), 0)
        hits = await target.search("p", "i", QUESTION, limit=3)
        assert hits[0].record.text == LONG_ANSWER
        assert [h.record.id for h in hits] == [
            h.record.id for h in await source.search("p", "i", QUESTION, limit=3)
        ]
    finally:
        await source.close()
        await target.close()


def test_passages_cover_what_the_model_does_not_read_in_pieces_it_reads_whole() -> None:
    model = MiniLMEmbedding()
    (pieces,) = model.split_passages([LONG_ANSWER])
    assert model.split_passages([LONG_ANSWER]) == [pieces]  # the same text, the same cut
    assert 3 <= len(pieces) <= MAX_PASSAGES
    reads = _minilm.MAX_TOKENS - 2
    assert all(word_pieces(p) <= min(PASSAGE_PIECES + 2, reads) for p in pieces)
    # from within what the message's own vector reads, to the end, without a gap
    starts = [LONG_ANSWER.index(p) for p in pieces]
    assert word_pieces(LONG_ANSWER[: starts[0]]) < reads
    for start, piece, after in zip(starts, pieces, starts[1:], strict=False):
        assert after <= start + len(piece)
    assert LONG_ANSWER.endswith(pieces[-1])
    # at sentence ends: each starts a sentence (these sentences are short enough)
    assert all(p[0].isupper() for p in pieces) and all(p.endswith(".") for p in pieces)
    assert model.split_passages(["short", "", CHATTER[0] * 20]) == [[], [], []]


def test_only_an_embedder_that_says_how_much_it_reads_gets_passages() -> None:
    remote = OpenAICompatibleEmbedding("text-embedding-3-small", url="http://127.0.0.1:9")
    assert passages_of(remote, [LONG_ANSWER]) == [[]]  # it may read it all: no call made
    assert passages_of(lambda texts: [[1.0] for _ in texts], [LONG_ANSWER]) == [[]]
    assert len(passages_of(MiniLMEmbedding(), [LONG_ANSWER])[0]) >= 3
    text = "x " * 300
    assert spans(text, [(2 * i, 2 * i + 1) for i in range(300)], ["x"] * 300, 254)
    assert spans(text, [(2 * i, 2 * i + 1) for i in range(254)], ["x"] * 254, 254) == []
