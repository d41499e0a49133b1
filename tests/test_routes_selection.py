"""Pure parts of the request path, without a server or a store: which request
carries memory for which scope (`asgi._routes`), and how candidates become
memory sections (`memory._selection`)."""

from __future__ import annotations

import pytest

from reservoir_middleware import MessageRecord
from reservoir_middleware.asgi._routes import ChatRoute, match_chat_route
from reservoir_middleware.context import Candidate
from reservoir_middleware.memory._selection import (
    Hit,
    build_units,
    fuse,
    neighbour_ids,
    recent_window,
)
from reservoir_middleware.memory.validation import InvalidName
from reservoir_middleware.records import Scope

# -- routes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/v1/partition/p/instance/i/chat/completions", ("p", "i", b"/v1/chat/completions")),
        (b"/partition/p/instance/i/v1/chat/completions/", ("p", "i", b"/v1/chat/completions")),
        (  # a mount prefix stays in the path the app sees
            b"/api/v1/partition/p/instance/i/chat/completions",
            ("p", "i", b"/api/v1/chat/completions"),
        ),
        (  # an encoded `/` stays inside the name; UTF-8 names are decoded
            b"/v1/partition/team%2Fa/instance/caf%C3%A9/chat/completions",
            ("team/a", "caf\u00e9", b"/v1/chat/completions"),
        ),
        (  # escapes of unreserved characters are decoded, as the router does
            b"/v1/partition/p/instance/i/%63hat/completions",
            ("p", "i", b"/v1/chat/completions"),
        ),
    ],
)
def test_scoped_chat_paths(raw: bytes, expected: tuple[str, str, bytes]) -> None:
    route = match_chat_route(raw, [])
    assert route is not None
    assert (route.partition, route.instance, route.raw_path) == expected


def test_plain_chat_paths_take_the_scope_from_headers() -> None:
    assert match_chat_route(b"/v1/chat/completions", []) == ChatRoute(
        "default", "default", b"/v1/chat/completions"
    )
    headers = [(b"X-Reservoir-Partition", b" team%20a "), (b"x-reservoir-instance", b"laptop")]
    route = match_chat_route(b"/chat/completions", headers)
    assert route == ChatRoute("team a", "laptop", b"/chat/completions")
    assert route.path == "/chat/completions"


def test_other_paths_carry_no_memory() -> None:
    for raw in (b"/v1/models", b"/v1/chat/completions/extra", b"/v1/partition/p/instance/i"):
        assert match_chat_route(raw, []) is None


@pytest.mark.parametrize(
    ("raw", "headers", "routed", "problem"),
    [
        (b"/v1/partition/%00/instance/i/chat/completions", [], None, "control characters"),
        (b"/v1/partition/p/instance/%FF/chat/completions", [], None, "not valid UTF-8"),
        (b"/v1/partition/../instance/i/chat/completions", [], None, "not allowed"),
        (b"/v1/chat/completions", [(b"x-reservoir-instance", b"\xff")], None, "UTF-8"),
        (b"/v1%2Fchat/completions", [], "/v1/chat/completions", "only once percent-decoded"),
    ],
)
def test_refused_chat_routes_say_why(
    raw: bytes, headers: list[tuple[bytes, bytes]], routed: str | None, problem: str
) -> None:
    with pytest.raises(InvalidName, match=problem):
        match_chat_route(raw, headers, routed)


# -- selection ---------------------------------------------------------------------


def message(
    n: int,
    role: str = "user",
    *,
    before: int | None = None,
    after: int | None = None,
    synapse: int | None = None,
) -> MessageRecord:
    return MessageRecord(
        id=f"m{n}",
        partition="p",
        instance="i",
        role=role,
        text=f"text {n}",
        seq=n,
        before_id=f"m{before}" if before is not None else None,
        after_id=f"m{after}" if after is not None else None,
        synapse_prev=f"m{synapse}" if synapse is not None else None,
    )


def test_one_plugin_keeps_its_order_and_scores_and_one_hit_per_message() -> None:
    reference = MessageRecord("m2", "p", "i", role="", text="")
    hits = fuse(
        [
            (
                "semantic",
                [
                    Candidate(message(1), "semantic", 0.5, "semantic"),
                    Candidate(reference, "semantic", 0.9, "semantic", resolved=False),
                    Candidate(message(1), "semantic", 0.1, "semantic"),  # again: ignored
                    Candidate(message(3), "recent", 5.0, "recent"),  # another section
                ],
            )
        ]
    )
    assert [(h.record.id, h.score, h.similarity, h.resolved) for h in hits] == [
        ("m2", 0.9, 0.9, False),
        ("m1", 0.5, 0.5, True),
    ]
    both = fuse(
        [
            ("a", [Candidate(reference, "semantic", 1.0, "semantic", resolved=False)]),
            ("b", [Candidate(message(2), "semantic", 3.0, "lexical")]),
        ]
    )
    assert both[0].resolved and both[0].record.text == "text 2"  # the read record wins
    assert both[0].similarity == 1.0  # the cosine of the dense plugin


def test_recent_window_is_the_newest_oldest_first_in_flight_last() -> None:
    pending = MessageRecord("new", "p", "i", role="user", text="in flight")  # seq -1
    outcome = [
        ("recent", [Candidate(message(n), "recent") for n in (4, 2, 3, 1)]),
        ("other", [Candidate(pending, "recent"), Candidate(message(2), "recent")]),
    ]
    window = recent_window(outcome, 3, excluded=lambda r: False)
    assert [r.id for r in window] == ["m3", "m4", "new"]
    assert [r.id for r in recent_window(outcome, 3, lambda r: r.id == "m4")] == ["m3", "new"]
    assert recent_window(outcome, 0, lambda r: False) == []


def test_neighbour_ids_are_per_scope() -> None:
    other = MessageRecord("x", "q", "i", role="user", text="", before_id="w")
    hits = [Hit(message(2, before=1, after=3), 1.0, None), Hit(other, 0.5, None)]
    assert neighbour_ids(hits) == {Scope("p", "i"): ["m1", "m3"], Scope("q", "i"): ["w"]}


def test_units_bring_answers_and_synapses_and_each_message_once() -> None:
    question = message(2, before=1, after=3, synapse=1)
    answer = message(3, "assistant", before=2, after=4)
    linked_before = message(1, before=0, after=2)
    later = message(4, "user", before=3, synapse=3)
    neighbours = {r.id: r for r in (linked_before, answer, later)}
    units = build_units(
        [Hit(question, 2.0, 0.8), Hit(answer, 1.0, 0.7), Hit(later, 0.5, None)],
        neighbours,
        pair_answers=True,
        synapse_limit=1,
        excluded=lambda r: False,
    )
    # the question brings its answer and the message it is linked to, in order;
    # the answer is in that unit already; the later message is linked to the answer
    assert [[r.id for r in u.records] for u in units] == [["m1", "m2", "m3"], ["m4"]]
    assert [(u.hit_id, u.score, u.similarity) for u in units] == [
        ("m2", 2.0, 0.8),
        ("m4", 0.5, None),
    ]
    alone = build_units(
        [Hit(question, 2.0, 0.8)],
        neighbours,
        pair_answers=False,
        synapse_limit=0,
        excluded=lambda r: False,
    )
    assert [[r.id for r in u.records] for u in alone] == [["m2"]]
    unpaired = build_units(
        [Hit(later, 1.0, None), Hit(question, 0.9, 0.8)],
        neighbours,
        pair_answers=True,
        synapse_limit=2,
        excluded=lambda r: r.id == "m3",  # (in the request): not brought along
        paired=1,  # only the best hit brings its neighbours
    )
    assert [[r.id for r in u.records] for u in unpaired] == [["m4"], ["m2"]]
