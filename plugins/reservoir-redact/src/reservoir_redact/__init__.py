"""reservoir-redact: removes secrets and personal data from messages before
reservoir-middleware stores them; the request sent upstream is left as it is.

Installed, it is active through the `reservoir` entry point `redact` (this
module's `plugin`); `RSV_DISABLE_PLUGINS=redact` turns it off. In code:

    from reservoir_redact import Redaction
    Reservoir(settings, plugins=[Redaction()])
"""

from .detectors import KINDS, MARKERS, luhn
from .plugin import Redaction

__all__ = ["KINDS", "MARKERS", "Redaction", "luhn", "plugin"]

plugin = Redaction()
"""The instance the entry point registers (settings read from the environment at import)."""
