"""Incremental inflation of a response body's copy (`gzip`/`x-gzip`/`deflate`),
in steps of bounded size, for the answer assemblers (`asgi._answer`)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

INFLATE_STEP = 256 * 1024  # bounds what one compressed chunk may expand to at once
ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


class Inflater:
    """Incremental gzip/deflate decoder; output comes in steps of bounded size."""

    __slots__ = ("_d", "_ended", "_gzip", "_probe")

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding != "deflate"
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)
        # "deflate" is meant zlib-wrapped but some servers send it raw: keep the first
        # bytes so they can be replayed into a raw decoder if the header check fails.
        self._probe: bytes | None = None if self._gzip else b""
        self._ended = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self._ended:
            return
        d = self._d
        if d.eof:  # the last chunk ended exactly where a gzip member did
            if not (self._gzip and chunk[:1] == b"\x1f"):
                self._ended = True
                return
            d = self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self._probe is not None:
            seen = self._probe + chunk
            try:
                out = d.decompress(chunk, INFLATE_STEP)
            except zlib.error:
                d = self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                self._probe = None
                out = d.decompress(seen, INFLATE_STEP)
            else:
                self._probe = seen if len(seen) < 64 else None
        else:
            out = d.decompress(chunk, INFLATE_STEP)
        while True:
            if out:
                yield out
            if d.unconsumed_tail:
                out = d.decompress(d.unconsumed_tail, INFLATE_STEP)
            elif d.eof and d.unused_data:
                rest = d.unused_data
                if not (self._gzip and rest[:1] == b"\x1f"):
                    self._ended = True  # trailing garbage after the body is ignored
                    return
                d = self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
                out = d.decompress(rest, INFLATE_STEP)
            else:
                return

    def flush(self) -> bytes:
        return b"" if self._ended else self._d.flush()


def coding_of(value: str | None) -> str | None:
    """The one coding to undo: "" for none/identity, ``None`` if not supported."""
    codings = [c.strip().lower() for c in (value or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in ENCODINGS:
        return codings[0]
    return None
