"""reservoir-redact through a real HTTP gateway (uvicorn, the middleware, embedded
Chroma, the embedding model; only the model is the local stand-in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from reservoir_redact import Redaction, luhn

from reservoir_middleware.storage.transfer import export_lines
from tests.conftest import GatewayFactory

# Fake, but in the exact shapes the detectors look for.
API_KEY = "sk-proj-Qm3xT9vLw2Zr8Kp4Yh6Nc1Bd5Fg7Js0Ua9Ee2Rt"
GITHUB = "ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
PHONE = "+33 6 12 34 56 78"
MESSAGE = (
    f"For the billing migration use the API key {API_KEY} and the deploy token {GITHUB}; "
    f"invoices go to {EMAIL}, charge the card {CARD} and call me on {PHONE} if it fails."
)
TRACES = [API_KEY, "Qm3xT9vLw2Zr8Kp4", GITHUB, EMAIL, "jane.doe", CARD, "4111111111111111", PHONE]
ADMIN_KEY = "admin-key-for-tests"


def assert_no_trace(text: str) -> None:
    for trace in TRACES:
        assert trace not in text


def files_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


async def test_secrets_reach_the_model_but_never_the_memory(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with gateway_factory(
        plugins=(Redaction(),), admin_key=ADMIN_KEY, load_entry_points=False
    ) as gw:
        first = await gw.chat([{"role": "user", "content": MESSAGE}])
        assert first.status_code == 200
        # The stand-in echoes the message: the answer carries the secrets too.
        assert API_KEY in first.json()["choices"][0]["message"]["content"]
        # Upstream got exactly what the user wrote.
        assert gw.upstream.received[0].messages[-1] == {"role": "user", "content": MESSAGE}

        stored = await gw.stored()
        assert [r.role for r in stored] == ["user", "assistant"]
        for record in stored:
            assert_no_trace(record.text)
            for marker in ("[secret]", "[email]", "[card]", "[phone]"):
                assert marker in record.text

        # A later request: the memory it carries is the redacted one.
        later = await gw.chat(
            [{"role": "user", "content": "Which API key and e-mail did I give you for billing?"}]
        )
        assert later.status_code == 200
        sent = gw.upstream.received[-1].text
        assert "[secret]" in sent and "[email]" in sent  # memory was injected...
        assert_no_trace(sent)  # ...without the secrets

        # The engine's reads, and the admin endpoints over HTTP.
        for query in ("billing migration API key", API_KEY, EMAIL):
            for semantic in (True, False):
                for hit in await gw.reservoir.search("p", "i", query, semantic=semantic):
                    assert_no_trace(hit.record.text)
        recent = await gw.reservoir.recent("p", "i")
        assert len(recent) == 4
        assert_no_trace(json.dumps([r.to_dict() for r in recent]))
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        memory = f"{gw.base()}/memory"
        for path, params in (
            ("/search", {"term": "Qm3xT9vLw2Zr8Kp4"}),
            ("/search", {"term": "jane.doe", "semantic": "true"}),
            ("/recent", {"limit": "100"}),
            ("/export", {}),
        ):
            response = await gw.http.get(memory + path, params=params, headers=headers)
            assert response.status_code == 200
            assert_no_trace(response.text)
        exported = [line async for line in export_lines(gw.reservoir.store, [recent[0].scope])]
        assert len(exported) == 4
        assert_no_trace("".join(exported))

        # Nowhere on disk either: not in Chroma's database, not in any index.
        raw = files_under(tmp_path / "memory")
        assert b"[secret]" in raw  # the scan does see the stored texts
        for trace in TRACES:
            assert trace.encode() not in raw


async def test_re_sent_history_is_recognised_though_stored_redacted(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(plugins=(Redaction(),), load_entry_points=False) as gw:
        await gw.chat([{"role": "user", "content": MESSAGE}])
        answer = f"Echo: {MESSAGE}"  # what the stand-in answered
        history = [
            {"role": "user", "content": MESSAGE},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Thanks, that is all."},
        ]
        response = await gw.chat(history)
        assert response.status_code == 200
        assert gw.upstream.received[-1].messages == history  # nothing to add: all in the request
        stored = await gw.stored()
        # The re-sent (unredacted) messages matched their redacted copies by id.
        assert [r.text.split(" ")[0] for r in stored] == ["For", "Echo:", "Thanks,", "Echo:"]


async def test_tool_call_arguments_and_results_are_redacted(
    gateway_factory: GatewayFactory,
) -> None:
    async with gateway_factory(plugins=(Redaction(),), load_entry_points=False) as gw:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "send_mail", "arguments": json.dumps({"to": EMAIL})},
        }
        await gw.reservoir.add(
            "p",
            "i",
            [
                {"role": "user", "content": "Mail the report."},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": f"sent with {API_KEY}"},
            ],
        )
        stored = await gw.stored()
        calls: list[dict[str, Any]] = stored[1].tool_calls or []
        assert json.loads(calls[0]["function"]["arguments"]) == {"to": "[email]"}
        assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "send_mail"
        assert stored[2].text == "sent with [secret]"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"key {API_KEY}.", "key [secret]."),
        ("sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx", "[secret]"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe [secret]"),
        (GITHUB, "[secret]"),
        ("AKIAIOSFODNN7EXAMPLE", "[secret]"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key = [secret]",
        ),
        ("Authorization: Bearer abc.def-ghi_jkl~mno+pqr/stu==", "Authorization: Bearer [secret]"),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "[secret]",
        ),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "[secret]"),
        ('{"api_key": "abcd1234efgh"}', '{"api_key": "[secret]"}'),
        ("my password is hunter2.", "my password is [secret]."),
        ("The password is written on the fridge.", "The password is written on the fridge."),
        ("Write to jane.doe+work@example.co.uk!", "Write to [email]!"),
        (f"card {CARD}", "card [card]"),
        ("5500-0000-0000-0004", "[card]"),
        ("4111 1111 1111 1112", "4111 1111 1111 1112"),  # fails Luhn
        ("IBAN DE89 3704 0044 0532 0130 00", "IBAN [iban]"),
        ("DE89 3704 0044 0532 0130 01", "DE89 3704 0044 0532 0130 01"),  # fails mod 97
        (f"call {PHONE}", "call [phone]"),
        ("(555) 123-4567 or 555.123.4567", "[phone] or [phone]"),
        ("+1-202-555-0173", "[phone]"),
        ("06 12 34 56 78 / 020 7946 0958", "[phone] / [phone]"),
        (
            "2024-05-01 at 10:30, v1.2.3, invoice 88213407, pi 3.14159, 192.168.1.1, 1,000,000",
            "2024-05-01 at 10:30, v1.2.3, invoice 88213407, pi 3.14159, 192.168.1.1, 1,000,000",
        ),
        ("Nothing to see here.", "Nothing to see here."),
    ],
)
def test_detectors(text: str, redacted: str) -> None:
    assert Redaction().redact(text) == redacted


def test_kinds_and_extra_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    only_email = Redaction(["email"])
    assert only_email.redact(f"{EMAIL} {API_KEY}") == f"[email] {API_KEY}"
    monkeypatch.setenv("RSV_REDACT_KINDS", "phone")
    monkeypatch.setenv("RSV_REDACT_PATTERNS", '["ACME-\\\\d{6}"]')
    from_env = Redaction()
    assert from_env.redact(f"{PHONE} ACME-123456 {EMAIL}") == f"[phone] [secret] {EMAIL}"
    with pytest.raises(ValueError, match="unknown redaction kind"):
        Redaction(["passport"])
    assert luhn("4111111111111111") and not luhn("4111111111111112")
