"""whisperr: a fast asyncio SDK for the Whisperr churn-signal ingestion API.

async with whisperr.AsyncClient(api_key="wrk_...") as client:
    client.track("user_8842", "payment_failed", {"amount_cents": 4900})
"""

from __future__ import annotations

import inspect as _inspect
import types as _types
import typing as _typing

# Imported now, not on first use: its fork and exit hooks must be in place before the process
# forks, so that a child that makes its client only after the fork still delivers at os._exit.
from . import _exit  # noqa: F401  (standard library only)
from ._version import __version__

if _typing.TYPE_CHECKING:
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


# Where each public name lives: imported on the first use of any (``import whisperr`` alone, as
# pytest's plugin loading does at every start, imports none of httpx, anyio, attrs or orjson).
_HOMES = {
    "AsyncClient": "_client",
    "Whisperr": "_compat",
    "Settings": "_config",
    **dict.fromkeys(
        ["current", "flush", "get_client", "identify", "identify_now", "init", "send"], "_default"
    ),
    **dict.fromkeys(["shutdown", "track"], "_default"),
    **dict.fromkeys(
        ["ClientClosedError", "ConfigError", "InvalidEventError", "SendError", "WhisperrError"],
        "_errors",
    ),
    "exit_on_sigterm": "_exit",
    **dict.fromkeys(["DeliveryReport", "FlushResult", "Receipt", "Stats"], "_models"),
    **dict.fromkeys(
        ["RequestScope", "UserTracker", "bind", "bind_user", "current_scope"], "_scope"
    ),
    **dict.fromkeys(["Client", "flush_after"], "_sync"),
    "BillingEvent": "billing",
}


def _load() -> None:
    """Import every public name from its home, then present the classes as ``whisperr.X``."""
    import importlib

    found = {
        name: getattr(importlib.import_module(f"{__name__}.{home}"), name)
        for name, home in _HOMES.items()
    }
    globals().update(found)
    _present_as_public([value for value in found.values() if isinstance(value, type)])


if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name in __all__:
            _load()
            return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """``dir(whisperr)`` (PEP 562): ``__all__``, the dunders, the public submodules imported.

    The private submodules (``whisperr._client``, ...) stay attributes, so ``import
    whisperr._client`` and ``mock.patch("whisperr._client....")`` keep working; they are only
    left out of the listing.
    """
    _load()  # dir() lists the public names: load them (and billing) as the first use does
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
