"""One exception hierarchy for everything a user can get wrong.

Every message says what was wrong and what to do about it, in one or two sentences, so that the
CLI can print it after ``error:`` and the app can show it with ``st.error`` unchanged.
"""

from __future__ import annotations

__all__ = ["TLError", "DatasetError", "ConfigError", "WeightsError", "RunError", "CancelledError", "ExportError",
           "ServeError", "ServerBusy"]


class TLError(Exception):
    """Base class: an error caused by the user's input or environment, with an actionable message."""


class DatasetError(TLError):
    """The dataset (folder, zip, CSV or an image in it) cannot be used as given."""


class ConfigError(TLError):
    """A training or command option is out of range or inconsistent."""


class WeightsError(TLError):
    """Pretrained or local weights cannot be found, loaded safely, or do not fit the architecture."""


class RunError(TLError):
    """A run id or run directory does not exist or is not in a usable state."""


class ExportError(TLError):
    """An export or a bundle cannot be written, read or verified."""


class CancelledError(TLError):
    """The user asked to stop; raised from inside the loop at the next check point."""


class ServeError(TLError):
    """The HTTP server (``tl-core serve``) cannot start: a missing extra, a port in use, a bad option."""


class ServerBusy(ServeError):
    """The HTTP server's queue is full; the request was not taken (HTTP 503)."""
