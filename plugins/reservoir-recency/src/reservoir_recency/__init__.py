"""reservoir-recency: memories of reservoir-middleware fade with age unless
they are recalled (a documented half-life), so a fresh or recently used
memory wins over an old, never-used one that is only about as similar.

Installed, it is active through the `reservoir` entry point `recency` (this
module's `plugin`); `RSV_DISABLE_PLUGINS=recency` turns it off. In code:

    from reservoir_recency import RecencyDecay
    Reservoir(settings, plugins=[RecencyDecay(settings.data_dir)])
"""

from .plugin import RecallLog, RecencyDecay, freshness, relevance

__all__ = ["RecallLog", "RecencyDecay", "freshness", "plugin", "relevance"]

plugin = RecencyDecay()
"""The instance the entry point registers; its directory is resolved on first use."""
