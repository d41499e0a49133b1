"""reservoir-bm25: lexical BM25 candidates for reservoir-middleware, from a
persistent SQLite FTS5 index kept next to the memory (`<data_dir>/bm25/`).

Installed, it is active through the `reservoir` entry point `bm25` (this
module's `plugin`); `RSV_DISABLE_PLUGINS=bm25` turns it off. In code:

    from reservoir_bm25 import Bm25Retrieval
    Reservoir(settings, plugins=[Bm25Retrieval(settings.data_dir)])
"""

from .plugin import Bm25Retrieval, query_terms

__all__ = ["Bm25Retrieval", "plugin", "query_terms"]

plugin = Bm25Retrieval()
"""The instance the entry point registers; its directory is resolved on first use."""
