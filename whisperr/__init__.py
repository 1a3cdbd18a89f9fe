"""whisperr: a fast asyncio SDK for the Whisperr churn-signal ingestion API.

async with whisperr.AsyncClient(api_key="wrk_...") as client:
    client.track("user_8842", "payment_failed", {"amount_cents": 4900})
"""

from __future__ import annotations

from ._client import AsyncClient
from ._compat import Whisperr
from ._config import Settings
from ._default import (
    current,
    flush,
    get_client,
    identify,
    identify_now,
    init,
    send,
    shutdown,
    track,
)
from ._errors import ClientClosedError, ConfigError, InvalidEventError, SendError, WhisperrError
from ._exit import exit_on_sigterm
from ._models import DeliveryReport, FlushResult, Receipt, Stats
from ._scope import RequestScope, UserTracker, bind, bind_user, current_scope
from ._sync import Client, flush_after
from ._version import __version__
from .billing import BillingEvent

__all__ = [
    "AsyncClient",
    "BillingEvent",
    "Client",
    "ClientClosedError",
    "ConfigError",
    "DeliveryReport",
    "FlushResult",
    "InvalidEventError",
    "Receipt",
    "RequestScope",
    "SendError",
    "Settings",
    "Stats",
    "UserTracker",
    "Whisperr",
    "WhisperrError",
    "__version__",
    "bind",
    "bind_user",
    "current",
    "current_scope",
    "exit_on_sigterm",
    "flush",
    "flush_after",
    "get_client",
    "identify",
    "identify_now",
    "init",
    "send",
    "shutdown",
    "track",
]
