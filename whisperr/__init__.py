"""whisperr: a fast asyncio SDK for the Whisperr churn-signal ingestion API.

async with whisperr.AsyncClient(api_key="wrk_...") as client:
    client.track("user_8842", "payment_failed", {"amount_cents": 4900})
"""

from __future__ import annotations

import inspect as _inspect
import types as _types
import typing as _typing

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


def _present_as_public(classes: list[type]) -> None:
    """Name each public class after the package: ``whisperr.InvalidEventError``, not its module.

    Tracebacks, ``repr(type)``, pickle and the documentation then use the public path. The
    string annotations (``from __future__ import annotations``) are evaluated first, in the
    module that wrote them, as ``typing.get_type_hints`` looks names up in ``__module__``'s
    globals; a class whose annotations cannot be evaluated keeps them as they are.
    """
    for cls in classes:
        own = _inspect.get_annotations(cls)
        if own:
            try:
                hints = _typing.get_type_hints(cls, include_extras=True)
            except Exception:  # pragma: no cover - a name only imported under TYPE_CHECKING
                continue
            cls.__annotations__ = {name: hints.get(name, value) for name, value in own.items()}
    for cls in classes:
        cls.__module__ = __name__


_present_as_public([value for value in map(globals().get, __all__) if isinstance(value, type)])
del _present_as_public


def __dir__() -> list[str]:
    """``dir(whisperr)`` (PEP 562): ``__all__``, the dunders, the public submodules imported.

    The private submodules (``whisperr._client``, ...) stay attributes, so ``import
    whisperr._client`` and ``mock.patch("whisperr._client....")`` keep working; they are only
    left out of the listing.
    """
    return sorted(
        name
        for name, value in globals().items()
        if name in __all__
        or (name.startswith("__") and name.endswith("__"))
        or (
            isinstance(value, _types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and not name.startswith("_")
        )
    )


del annotations  # the __future__ feature object; the flag itself applies at compile time
