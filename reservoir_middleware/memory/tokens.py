"""Exact token counts and per-model context limits, offline.

tiktoken downloads its BPE files on first use, which fails on an offline
install, so the two encodings we need ship in ``encodings/`` and are loaded
from there (hash-checked, never via the network or TIKTOKEN_CACHE_DIR). All
functions are plain and synchronous: callers run them in a worker thread.

An encoding costs memory for good (o200k_base ~45 MB, cl100k_base ~20 MB), so
each is loaded when a model of its family is first counted; the warm-up loads
only o200k_base, the one of every model but the GPT-4 / 3.5 generation.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from reservoir_middleware._malloc import trim

ENCODINGS_DIR = Path(__file__).with_name("encodings")
# The sha256 tiktoken_ext.openai_public expects for each file; checked on load.
EXPECTED_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Chat accounting from OpenAI's cookbook ("How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Estimates, not exact: images are billed by size; these are the "low" detail
# price and the price of a 512x512 "high"/"auto" image (85 + 4 tiles * 170).
IMAGE_LOW_TOKENS = 85
IMAGE_HIGH_TOKENS = 765
# Audio and file parts have no tokenizer-level count; a flat placeholder.
MEDIA_PART_TOKENS = 256
# Per tool call: framing of the call (id, type, separators) around name+arguments.
TOOL_CALL_OVERHEAD = 3

_CL100K_PREFIXES = ("gpt-3.5", "gpt-35", "text-embedding-ada", "text-embedding-3")

# The encoding most models use: loaded at warm-up; the other one on first use.
WARM_UP_ENCODINGS = ("o200k_base",)

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def _base_name(model: str | None) -> str:
    """Lower-case model id without LiteLLM provider prefixes ("azure/...") or "ft:"."""
    name = (model or "").strip().lower().rsplit("/", 1)[-1]
    return name.removeprefix("ft:")


def encoding_name_for_model(model: str | None) -> str:
    """cl100k_base for the GPT-4 / 3.5 generation; o200k_base for newer and unknown models."""
    name = _base_name(model)
    if name == "gpt-4" or name.startswith("gpt-4-") or name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def _load_local_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stands in for tiktoken.load.load_tiktoken_bpe: the vendored file, no cache, no network."""
    name = url.rsplit("/", 1)[-1].removesuffix(".tiktoken")
    pinned = EXPECTED_SHA256.get(name)
    if pinned is None or (expected_hash is not None and expected_hash != pinned):
        raise RuntimeError(f"no vendored tiktoken file matches {url} ({expected_hash})")
    data = (ENCODINGS_DIR / f"{name}.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != pinned:
        raise RuntimeError(f"vendored {name}.tiktoken is corrupted (sha256 mismatch)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _VendoredEncoding(tiktoken.Encoding):
    """A tiktoken Encoding without its Python copy of the ranks.

    tiktoken keeps the ranks twice: in its Rust core and as a Python dict
    that it only reads to pickle the encoding (26 MB of small objects for
    o200k_base, 14 MB for cl100k_base). Here the dict is dropped once the core
    is built and read again from the vendored file if ever asked for.
    """

    @property
    def _mergeable_ranks(self) -> dict[bytes, int]:
        return _load_local_bpe(f"{self.name}.tiktoken", EXPECTED_SHA256[self.name])

    @_mergeable_ranks.setter
    def _mergeable_ranks(self, ranks: dict[bytes, int]) -> None:
        pass  # the core is built from the constructor's argument, not from this


def _build(name: str) -> tiktoken.Encoding:
    """Run tiktoken's own constructor (pattern, special tokens) with our local loader.

    The function is re-created with patched globals rather than monkeypatching
    the module, so concurrent users of tiktoken are unaffected.
    """
    from tiktoken_ext import openai_public

    ctor = openai_public.ENCODING_CONSTRUCTORS[name]
    scope = dict(ctor.__globals__, load_tiktoken_bpe=_load_local_bpe)
    local_ctor = types.FunctionType(ctor.__code__, scope, ctor.__name__, ctor.__defaults__)
    return _VendoredEncoding(**local_ctor())


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named vendored encoding, built once per process (thread-safe)."""
    enc = _cache.get(name)
    if enc is None:
        if name not in EXPECTED_SHA256:
            raise ValueError(f"unknown encoding {name!r}; vendored: {sorted(EXPECTED_SHA256)}")
        with _lock:
            enc = _cache.get(name)
            if enc is None:
                enc = _cache[name] = _build(name)
                trim()  # the file's bytes and the ranks dict, freed
    return enc


def loaded_encodings() -> list[str]:
    """The encodings this process has loaded so far."""
    return sorted(_cache)


def count_text(text: str, model: str | None = None) -> int:
    """Tokens of plain text; special-token markers in user text count as ordinary text."""
    return len(get_encoding(encoding_name_for_model(model)).encode_ordinary(text))


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # e.g. circular structures
        return repr(value)


def _count_value(value: Any, enc: tiktoken.Encoding) -> int:
    if value is None:
        return 0
    return len(enc.encode_ordinary(value if isinstance(value, str) else _json(value)))


def _count_part(part: Any, enc: tiktoken.Encoding) -> int:
    if not isinstance(part, Mapping):
        return _count_value(part, enc)
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text"):
        return _count_value(part.get("text"), enc)
    if kind == "refusal":
        return _count_value(part.get("refusal"), enc)
    if kind in ("image_url", "input_image"):
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
        return IMAGE_LOW_TOKENS if detail == "low" else IMAGE_HIGH_TOKENS
    if kind in ("input_audio", "file", "input_file"):
        return MEDIA_PART_TOKENS
    return _count_value(part, enc)


def _count_tool_calls(calls: Any, enc: tiktoken.Encoding) -> int:
    if not isinstance(calls, list):
        return _count_value(calls, enc)
    total = 0
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping):
            total += TOOL_CALL_OVERHEAD
            total += _count_value(fn.get("name"), enc) + _count_value(fn.get("arguments"), enc)
        else:
            total += _count_value(call, enc)
    return total


def count_message(message: Mapping[str, Any], model: str | None = None) -> int:
    """One chat message, the cookbook way; never raises on odd shapes."""
    enc = get_encoding(encoding_name_for_model(model))
    if not isinstance(message, Mapping):
        return TOKENS_PER_MESSAGE + _count_value(message, enc)
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content" and isinstance(value, list):
            total += sum(_count_part(part, enc) for part in value)
        elif key == "tool_calls":
            total += _count_tool_calls(value, enc)
        else:
            total += _count_value(value, enc)
        if key == "name":
            total += TOKENS_PER_NAME
    return total


def count_messages(messages: Sequence[Mapping[str, Any]], model: str | None = None) -> int:
    """A whole prompt: every message plus the 3 tokens that prime the reply."""
    return sum(count_message(m, model) for m in messages) + REPLY_PRIMING


# Context windows (input + output) of common models, matched exactly, then by
# longest prefix on the provider-stripped, lower-cased id.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-5": 400_000, "gpt-5-chat": 128_000,
    "gpt-4.1": 1_047_576, "gpt-4.5": 128_000, "gpt-4o": 128_000, "chatgpt-4o": 128_000,
    "gpt-4": 8_192, "gpt-4-32k": 32_768, "gpt-4-turbo": 128_000,
    "gpt-4-1106": 128_000, "gpt-4-0125": 128_000, "gpt-4-vision": 128_000,
    "gpt-3.5-turbo": 16_385, "gpt-35-turbo": 16_385, "gpt-3.5-turbo-instruct": 4_096,
    "o1": 200_000, "o1-mini": 128_000, "o1-preview": 128_000, "o3": 200_000, "o4-mini": 200_000,
    "gpt-oss": 131_072,
    "claude-2": 100_000, "claude-2.1": 200_000, "claude-3": 200_000,
    "claude-sonnet-4": 200_000, "claude-opus-4": 200_000, "claude-haiku-4": 200_000,
    "gemini-1.5-pro": 2_097_152, "gemini-1.5-flash": 1_048_576,
    "gemini-2.0": 1_048_576, "gemini-2.5": 1_048_576,
    "mistral-large": 128_000, "mistral-small": 32_000, "open-mistral-nemo": 128_000,
    "mixtral-8x7b": 32_768,
    "llama2": 4_096, "llama-2": 4_096, "llama3": 8_192, "llama-3": 8_192, "meta-llama-3": 8_192,
    "llama3.1": 131_072, "llama-3.1": 131_072, "meta-llama-3.1": 131_072,
    "llama3.2": 131_072, "llama-3.2": 131_072, "llama3.3": 131_072, "llama-3.3": 131_072,
    "qwen2.5": 32_768, "qwen-2.5": 32_768,
}  # fmt: skip


def _lookup(table: Mapping[str, int], names: tuple[str, ...], *, star: bool) -> int | None:
    """Exact match, else the longest key that prefixes a name (only "x*" keys if `star`)."""
    for name in names:
        if name in table:
            return table[name]
    best: tuple[int, int] | None = None
    for key, value in table.items():
        if star and not key.endswith("*"):
            continue
        stem = key.removesuffix("*")
        if any(n.startswith(stem) for n in names) and (best is None or len(stem) > best[0]):
            best = (len(stem), value)
    return None if best is None else best[1]


def _litellm_window(model: str) -> int | None:
    """LiteLLM's model table when the host (a LiteLLM proxy) has loaded it already.

    Never imported here: importing LiteLLM takes seconds and may reach the
    network for its price map. Any failure means "unknown".
    """
    if "litellm" not in sys.modules:
        return None
    return _litellm_lookup(model)


@functools.lru_cache(maxsize=256)
def _litellm_lookup(model: str) -> int | None:
    try:
        value = sys.modules["litellm"].get_model_info(model)["max_input_tokens"]
    except Exception:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class ModelLimits:
    """How many prompt tokens a request may use: window minus the reply's reserve."""

    OUTPUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")

    def __init__(
        self,
        overrides: Mapping[str, int] | None = None,
        default_window: int = 8192,
        default_output_reserve: int = 1024,
    ) -> None:
        self.overrides = {k.strip().lower(): int(v) for k, v in (overrides or {}).items()}
        self.default_window = default_window
        self.default_output_reserve = default_output_reserve

    def known_window(self, model: str | None) -> int | None:
        """Overrides, then the built-in table, then LiteLLM; None when the model is unknown."""
        if not model:
            return None
        names = tuple(dict.fromkeys((model.strip().lower(), _base_name(model))))
        found = _lookup(self.overrides, names, star=True)
        if found is None:
            found = _lookup(CONTEXT_WINDOWS, (names[-1],), star=False)
        if found is None:
            found = _litellm_window(model)
        return found

    def context_window(self, model: str | None) -> int:
        """The known window, else the default (what memory is trimmed to)."""
        found = self.known_window(model)
        return self.default_window if found is None else found

    def default_reserve(self, window: int) -> int:
        return min(self.default_output_reserve, window // 4)

    def output_reserve(self, body: Mapping[str, Any], model: str | None = None) -> int:
        """The client's own output cap if it set one, at most half the window (a
        larger one is the provider's to judge, not a reason to drop the prompt);
        else the default, at most a quarter of the window."""
        model = model if model is not None else body.get("model")
        window = self.context_window(model if isinstance(model, str) else None)
        for key in self.OUTPUT_KEYS:
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return min(value, window // 2)
        return self.default_reserve(window)

    def input_limit(self, model: str | None, body: Mapping[str, Any]) -> int:
        """Tokens the prompt may take so the reply still fits; at least 1."""
        return max(1, self.context_window(model) - self.output_reserve(body, model))

    def refusal_limit(self, model: str | None, body: Mapping[str, Any]) -> int | None:
        """The most tokens the last message may take before the "too long" answer.

        None for a model whose window is unknown: it is never refused. The
        client's output cap may only lower the reserve here, never raise it:
        a large `max_tokens` is the provider's to judge.
        """
        window = self.known_window(model)
        if window is None:
            return None
        reserve = min(self.output_reserve(body, model), self.default_reserve(window))
        return max(1, window - reserve)


def warm_up_encodings() -> None:
    """Load the encoding most models use now (about 0.2 s), so their requests do not pay for it."""
    for name in WARM_UP_ENCODINGS:
        get_encoding(name)
