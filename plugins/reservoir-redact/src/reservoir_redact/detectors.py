"""What counts as a secret or personal data, and what replaces it.

Each detector is a regular expression, some with a check on the match (Luhn
for card numbers, mod 97 for IBANs, a digit count for phone numbers). They
run in a fixed order: secrets first (a token may contain digits or an `@`),
then e-mail addresses, card numbers, IBANs and phone numbers last.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

KINDS = ("secret", "email", "card", "iban", "phone")
MARKERS = {kind: f"[{kind}]" for kind in KINDS}


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    check: Callable[[re.Match[str]], bool] | None = None
    group: int = 0  # the part of the match that is replaced (0: all of it)

    def redact(self, text: str) -> str:
        marker = MARKERS.get(self.kind, f"[{self.kind}]")

        def replace(match: re.Match[str]) -> str:
            if self.check is not None and not self.check(match):
                return match.group(0)
            if self.group == 0:
                return marker
            start = match.start(self.group) - match.start(0)
            end = match.end(self.group) - match.start(0)
            whole = match.group(0)
            return whole[:start] + marker + whole[end:]

        return self.pattern.sub(replace, text)


def luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _card(match: re.Match[str]) -> bool:
    digits = _digits(match.group(0))
    return 13 <= len(digits) <= 19 and luhn(digits)


def _iban(match: re.Match[str]) -> bool:
    compact = re.sub(r"\s", "", match.group(0)).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _phone(low: int, high: int) -> Callable[[re.Match[str]], bool]:
    def check(match: re.Match[str]) -> bool:
        return low <= len(_digits(match.group(0))) <= high

    return check


def _is_secret_value(match: re.Match[str]) -> bool:
    """`password is X`: X must look like a secret (a digit or a symbol in it),
    so "the password is written on the fridge" stays."""
    value = match.group("value")
    return any(not c.isalpha() for c in value)


# Not a letter, digit or one of the characters tokens are made of, before a token.
_B = r"(?<![A-Za-z0-9_\-])"
_E = r"(?![A-Za-z0-9_\-])"

SECRETS = [
    # PEM private keys, whole blocks
    r"-----BEGIN[A-Z ]*PRIVATE KEY-----[\s\S]*?-----END[A-Z ]*PRIVATE KEY-----",
    # JSON Web Tokens: header.payload.signature, base64url, header starting {"
    _B + r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}" + _E,
    # OpenAI / Anthropic style keys (sk-..., sk-proj-..., sk-ant-...)
    _B + r"sk-[A-Za-z0-9_\-]{20,}" + _E,
    # Stripe secret and restricted keys
    _B + r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}" + _E,
    # GitHub tokens (classic and fine-grained)
    _B + r"gh[pousr]_[A-Za-z0-9]{30,}" + _E,
    _B + r"github_pat_[A-Za-z0-9_]{30,}" + _E,
    # GitLab, Slack, Hugging Face, npm, Google API keys
    _B + r"glpat-[A-Za-z0-9_\-]{20,}" + _E,
    _B + r"xox[abposr]-[A-Za-z0-9\-]{10,}" + _E,
    _B + r"hf_[A-Za-z0-9]{30,}" + _E,
    _B + r"npm_[A-Za-z0-9]{36}" + _E,
    _B + r"AIza[A-Za-z0-9_\-]{35}" + _E,
    # AWS access key ids
    _B + r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}" + _E,
]

DETECTORS: list[Detector] = [
    *(Detector("secret", re.compile(p)) for p in SECRETS),
    # Authorization: Bearer <token> (also "Basic", and "token <x>" of some APIs)
    Detector(
        "secret",
        re.compile(r"(?i)\b(?:bearer|basic|token)\s+([A-Za-z0-9\-._~+/]{12,}=*)"),
        group=1,
    ),
    # key = value / key: value for names that hold secrets
    Detector(
        "secret",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|passphrase|secret|client[_\- ]?secret|api[_\- ]?key"
            r"|access[_\- ]?key|secret[_\- ]?key|aws_secret_access_key|access[_\- ]?token"
            r"|auth[_\- ]?token|refresh[_\- ]?token|private[_\- ]?key)\b"
            r"[\"']?\s*[:=]\s*[\"']?(?P<value>[^\s\"',;]{4,})"
        ),
        group=1,
    ),
    # "my password is hunter2"
    Detector(
        "secret",
        re.compile(
            r"(?i)\b(?:password|passwd|passphrase|pin|secret|api key|token)\s+(?:is|was)\s+"
            r"[\"']?(?P<value>[^\s\"',;]{4,}?)[\"']?(?=[\s.,;!?\"']|$)"
        ),
        check=_is_secret_value,
        group=1,
    ),
    Detector(
        "email",
        re.compile(
            r"(?<![\w.+\-])[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]+@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
        ),
    ),
    # payment cards: 13 to 19 digits, single spaces or dashes between groups, Luhn-valid
    Detector("card", re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])"), check=_card),
    Detector(
        "iban",
        re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b"),
        check=_iban,
    ),
    # international: +CC then 7 to 14 more digits in groups
    Detector(
        "phone",
        re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,6}(?!\w)"),
        check=_phone(8, 15),
    ),
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    Detector(
        "phone",
        re.compile(r"(?<![\w\-.])(?:\(\d{3}\)\s?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|\.\d)"),
        check=_phone(10, 10),
    ),
    # national numbers with a trunk 0: 06 12 34 56 78, 020 7946 0958, 030 1234567
    Detector(
        "phone",
        re.compile(r"(?<![\w\-.])0\d{1,4}(?:[ .\-/]\d{2,8}){1,4}(?![\w\-]|\.\d)"),
        check=_phone(9, 12),
    ),
]


def detectors_for(kinds: Iterable[str], extra_patterns: Iterable[str] = ()) -> list[Detector]:
    """The detectors of these kinds, in the fixed order, then the extra
    patterns (each replaced by `[secret]`)."""
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(
            f"unknown redaction kind(s): {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}"
        )
    chosen = [d for d in DETECTORS if d.kind in wanted]
    chosen += [Detector("secret", re.compile(p)) for p in extra_patterns]
    return chosen


def redact_text(text: str, detectors: Iterable[Detector]) -> str:
    for detector in detectors:
        text = detector.redact(text)
    return text
