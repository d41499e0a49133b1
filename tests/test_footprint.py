"""An idle `reservoir serve` holds only what it uses: the package loads its API on first
use, the Chroma child imports no Chroma client and no engine, the embedding model keeps
its word embeddings in int8 with the same outputs, only the token encoding a model uses
is loaded, and freed buffers go back to the system. (`bench/footprint.py` measures it.)"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from reservoir_middleware import _malloc
from reservoir_middleware.memory import _minilm, _onnxgraph, tokens
from reservoir_middleware.storage._child import TRIM_AFTER_IDLE_S, ChromaServer

MIB = 1024 * 1024


def python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def status(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024
    raise KeyError(key)


def test_the_package_loads_its_api_on_first_use() -> None:
    out = python(
        """
        import sys
        import reservoir_middleware as rm
        print("engine" if "reservoir_middleware.engine" in sys.modules else "-")
        from reservoir_middleware import (
            Enrichment, MessageRecord, Reservoir, ReservoirMiddleware, ReservoirSettings,
            Scope, SearchHit, TooLong, hookimpl, hookspecs,
        )
        from reservoir_middleware.engine import Reservoir as Engine
        assert Reservoir is Engine and rm.Reservoir is Engine
        assert set(rm.__all__) <= set(dir(rm)) and hookspecs.hookimpl is hookimpl
        try:
            rm.Nothing
        except AttributeError as exc:
            print(exc)
        """
    )
    assert out.splitlines() == ["-", "module 'reservoir_middleware' has no attribute 'Nothing'"]


def test_the_chroma_child_imports_no_chroma_client_and_no_engine_and_trims_when_idle(
    tmp_path: Path,
) -> None:
    server = ChromaServer(tmp_path, embed_threads=1)
    try:
        server.start()
        assert server._proc is not None
        pid = server._proc.pid
        assert len(server.embed(["warm up"])[0]) == 384
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" in maps and "chromadb_rust_bindings" in maps
        # pydantic comes with chromadb's client and the settings; tiktoken with the engine
        assert "pydantic_core" not in maps and "_tiktoken" not in maps

        time.sleep(TRIM_AFTER_IDLE_S + 1)
        idle, peak = status(pid, "VmRSS"), status(pid, "VmHWM")
        answer = "the bakery in Porto opens at seven " * 40
        server.embed([f"answer {n}: {answer}" for n in range(16)])
        assert status(pid, "VmHWM") > peak + 40 * MIB  # the batch's buffers...
        deadline = time.monotonic() + TRIM_AFTER_IDLE_S + 10
        while status(pid, "VmRSS") > idle + 16 * MIB and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status(pid, "VmRSS") <= idle + 16 * MIB  # ...given back once it is idle
    finally:
        server.stop()


def test_the_word_embeddings_stay_int8_with_the_same_outputs() -> None:
    import onnxruntime as ort

    runtime = _minilm._load_runtime(1)
    model, _ = _minilm._model_file()
    shipped = model.read_bytes()
    assert _onnxgraph.gather_quantized(shipped, _minilm.WORD_EMBEDDINGS) != shipped
    for table, data in (("no.such.table", shipped), (_minilm.WORD_EMBEDDINGS, b"\x0f")):
        with pytest.raises(_onnxgraph.NotRewritable):  # then the file is loaded as it is
            _onnxgraph.gather_quantized(data, table)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    original = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(13)
    for _ in range(20):
        rows, width = int(rng.integers(1, 5)), int(rng.integers(2, 200))
        ids = rng.integers(0, 30522, (rows, width)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, width - int(rng.integers(0, width // 2 + 1)) :] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        ours = runtime.session.run([runtime.output_name], feeds)[0]
        assert np.array_equal(ours, original.run([runtime.output_name], feeds)[0])


def test_the_model_takes_under_100_mb_and_a_big_batch_gives_its_memory_back() -> None:
    out = python(
        """
        import threading
        import onnxruntime, tokenizers
        from reservoir_middleware.memory.embeddings import MiniLMEmbedding
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        before = rss()
        model = MiniLMEmbedding(threads=1)
        model.load()
        loaded = rss()
        texts = ["the bakery in Porto opens at seven " * 40] * 8
        batch = threading.Thread(target=model.embed, args=(texts,))  # as the engine runs it
        batch.start()
        batch.join()
        print(loaded - before, rss() - loaded)
        """
    )
    model, batch = map(int, out.split())
    assert model < 100 * MIB  # before: 186 MB (the word embeddings in float32, heap left over)
    assert batch < 30 * MIB  # before: 50 to 300 MB kept by the arena or the heap


def test_the_warm_up_loads_only_the_encoding_most_models_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokens, "_cache", {})
    tokens.warm_up_encodings()
    assert tokens.loaded_encodings() == ["o200k_base"]
    tokens.count_text("hello", "gpt-4o")
    tokens.count_messages([{"role": "user", "content": "hello"}], "llama3.2")
    assert tokens.loaded_encodings() == ["o200k_base"]
    assert tokens.count_text("hello world", "gpt-4") == 2  # its family's encoding, on first use
    assert tokens.loaded_encodings() == ["cl100k_base", "o200k_base"]


def test_an_encoding_keeps_no_python_copy_of_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_cache", {})
    enc = tokens.get_encoding("cl100k_base")
    assert "_mergeable_ranks" not in vars(enc)  # the Rust core has its own
    assert len(enc._mergeable_ranks) == 100256  # read again from the file when asked
    again = pickle.loads(pickle.dumps(enc))
    assert again.encode("hello world") == enc.encode("hello world") == [15339, 1917]


def test_malloc_trim_is_available_on_glibc() -> None:
    assert _malloc.trim() is (sys.platform.startswith("linux") and _glibc())


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
