"""Which provider serves a model, and which models a provider has (for `reservoir serve`).

Routing follows Reservoir's rules by model name, extended by the user's
`model_routes` and `providers` tables. Model lists and health come from the
providers' own `/models` endpoints, cached, never from a list kept here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from dataclasses import dataclass

import httpx

from reservoir_middleware.settings import ReservoirSettings

MODEL_LIST_TTL = 600.0
FAILURE_TTL = 30.0
PROBE_TIMEOUT = 2.0

# Checked in order, after the user's own `model_routes`. A name with a `:` tag
# is an Ollama model (`mistral:7b`, `gpt-oss:20b`).
BUILTIN_ROUTES: tuple[tuple[str, str], ...] = (
    ("*:*", "ollama"),
    ("gpt-*", "openai"),
    ("chatgpt-*", "openai"),
    ("o1*", "openai"),
    ("o3*", "openai"),
    ("o4*", "openai"),
    ("text-embedding-*", "openai"),
    ("mistral-*", "mistral"),
    ("codestral-*", "mistral"),
    ("gemini-*", "gemini"),
    ("llama*", "ollama"),
    ("codellama*", "ollama"),
)

_ENDPOINT_SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/models")


def normalize_base_url(url: str) -> str:
    """The API base of a URL given either as `…/v1` or as a full endpoint
    (`…/v1/chat/completions`, the form Reservoir used)."""
    base = url.strip().rstrip("/")
    for suffix in _ENDPOINT_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].rstrip("/")
    return base


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key_env: str | None = None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def auth_header(self) -> str | None:
        key = self.api_key()
        return f"Bearer {key}" if key else None


def builtin_providers(settings: ReservoirSettings) -> dict[str, Provider]:
    return {
        "openai": Provider(
            "openai", normalize_base_url(settings.openai_base_url), "OPENAI_API_KEY"
        ),
        "mistral": Provider(
            "mistral", normalize_base_url(settings.mistral_base_url), "MISTRAL_API_KEY"
        ),
        "gemini": Provider(
            "gemini", normalize_base_url(settings.gemini_base_url), "GEMINI_API_KEY"
        ),
        "ollama": Provider("ollama", normalize_base_url(settings.ollama_base_url), None),
    }


class Router:
    """Model name → provider, plus the cached model lists and health of providers."""

    def __init__(self, settings: ReservoirSettings) -> None:
        self.providers = builtin_providers(settings)
        for name, conf in settings.providers.items():
            self.providers[name] = Provider(
                name, normalize_base_url(conf.base_url), conf.api_key_env
            )
        self.routes = [*settings.model_routes.items(), *BUILTIN_ROUTES]
        self.auto_models = list(settings.auto_models)
        self._models: dict[str, tuple[float, list[str] | None]] = {}

    def route(self, model: str) -> Provider | None:
        lowered = model.lower()
        for pattern, provider in self.routes:
            if fnmatch.fnmatchcase(lowered, pattern.lower()) and provider in self.providers:
                return self.providers[provider]
        return None

    def describe_routes(self) -> str:
        return ", ".join(f"{pattern} → {provider}" for pattern, provider in self.routes)

    async def models(
        self, client: httpx.AsyncClient, provider: Provider, auth: str | None = None
    ) -> list[str] | None:
        """The provider's model ids from its `/models` (cached), or None if unreachable."""
        auth = auth or provider.auth_header()
        key = provider.name + "\x00" + hashlib.sha256((auth or "").encode()).hexdigest()
        cached = self._models.get(key)
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return cached[1]
        headers = {"authorization": auth} if auth else {}
        try:
            response = await client.get(
                f"{provider.base_url}/models", headers=headers, timeout=PROBE_TIMEOUT
            )
            response.raise_for_status()
            data = response.json().get("data", [])
            ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            self._models[key] = (now + FAILURE_TTL, None)
            return None
        self._models[key] = (now + MODEL_LIST_TTL, ids)
        return ids

    async def auto(self, client: httpx.AsyncClient) -> tuple[Provider, str] | None:
        """The first reachable choice of `auto_models` (`provider:model`, or
        `provider:*` for the first model the provider lists)."""
        for choice in self.auto_models:
            name, _, model = choice.partition(":")
            provider = self.providers.get(name)
            if provider is None or (provider.api_key_env and not provider.api_key()):
                continue
            listed = await self.models(client, provider)
            if not listed:
                continue
            if model in ("", "*"):
                return provider, listed[0]
            if model in listed:
                return provider, model
        return None
