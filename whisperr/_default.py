"""The module-level API: one default AsyncClient behind ``whisperr.init()`` and friends."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._client import AsyncClient
from ._config import KeylessSettingsArgs, Settings
from ._errors import WhisperrError
from ._models import FlushResult, Receipt
from ._scope import UserTracker, current_scope
from ._sync import Client

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no dependency: the annotations are never evaluated
    from typing_extensions import Unpack

logger = logging.getLogger("whisperr")

_default: AsyncClient | None = None
# A test capture's client (whisperr.testing), installed as the default: init() returns it and
# shutdown() only flushes it, until the capture puts back what it set aside.
_installed: AsyncClient | None = None


def init(api_key: str | None = None, **settings: Unpack[KeylessSettingsArgs]) -> AsyncClient:
    """Create the default client; settings not passed are read from ``WHISPERR_*`` variables.

    While a test capture is installed (``whisperr_capture``, ``Capture.installed()``), it
    returns the capture's client instead, and the settings passed are not used.

    Raises:
        WhisperrError: a default client is already open; ``await whisperr.shutdown()`` first.
        ConfigError: the settings are invalid (for example no API key anywhere).
    """
    global _default
    if _installed is not None:
        logger.debug("whisperr.init() returns the test capture's client; the settings are unused")
        return _installed
    if _default is not None:
        raise WhisperrError("whisperr.init() was already called; await whisperr.shutdown() first")
    if api_key is None:
        _default = AsyncClient(Settings.from_env(**settings))
    else:
        _default = AsyncClient(Settings.from_env(api_key=api_key, **settings))
    return _default


def get_client() -> AsyncClient:
    """The default client.

    Raises:
        WhisperrError: ``whisperr.init()`` has not been called.
    """
    if _default is None:
        raise WhisperrError("call whisperr.init(api_key=...) before using the module-level API")
    return _default


def track(
    external_user_id: str,
    event_type: str,
    properties: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    occurred_at: Any = None,
    message_id: str | None = None,
) -> str:
    """``track()`` on the default client; see :meth:`AsyncClient.track`."""
    return get_client().track(
        external_user_id,
        event_type,
        properties,
        context,
        occurred_at=occurred_at,
        message_id=message_id,
    )


def identify(
    external_user_id: str,
    traits: Mapping[str, Any] | None = None,
    *,
    email: str | None = None,
    phone: str | None = None,
    push_token: str | None = None,
    preferred_channel: str | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """``identify()`` on the default client; see :meth:`AsyncClient.identify`."""
    get_client().identify(
        external_user_id,
        traits,
        email=email,
        phone=phone,
        push_token=push_token,
        preferred_channel=preferred_channel,
        channels=channels,
    )


async def send(
    external_user_id: str,
    event_type: str,
    properties: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    occurred_at: Any = None,
    message_id: str | None = None,
    timeout: float | None = None,
) -> Receipt:
    """``send()`` on the default client; see :meth:`AsyncClient.send`."""
    return await get_client().send(
        external_user_id,
        event_type,
        properties,
        context,
        occurred_at=occurred_at,
        message_id=message_id,
        timeout=timeout,
    )


async def identify_now(
    external_user_id: str,
    traits: Mapping[str, Any] | None = None,
    *,
    email: str | None = None,
    phone: str | None = None,
    push_token: str | None = None,
    preferred_channel: str | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
    timeout: float | None = None,
) -> Receipt:
    """``identify_now()`` on the default client; see :meth:`AsyncClient.identify_now`."""
    return await get_client().identify_now(
        external_user_id,
        traits,
        email=email,
        phone=phone,
        push_token=push_token,
        preferred_channel=preferred_channel,
        channels=channels,
        timeout=timeout,
    )


def current(client: AsyncClient | Client | None = None) -> UserTracker:
    """``track()``/``identify()`` for the current request's user, on ``client`` (default: the
    module-level client).

    An integration (``whisperr.django``, ``whisperr.asgi``, ``whisperr.aiohttp``) or
    :func:`whisperr.bind` sets who that is; see :class:`UserTracker`.
    """
    return UserTracker(get_client() if client is None else client, current_scope())


async def flush(timeout: float | None = None) -> FlushResult:
    """``flush()`` on the default client; see :meth:`AsyncClient.flush`."""
    return await get_client().flush(timeout)


async def shutdown(timeout: float | None = None) -> FlushResult | None:
    """Close the default client (delivering what is queued) and forget it; None if there is none.

    While a test capture is installed, its client is flushed (within ``timeout``, default
    ``shutdown_timeout``) and stays installed and open.
    """
    global _default
    installed = _installed
    if installed is not None:
        logger.debug("whisperr.shutdown() flushes the test capture's client and keeps it")
        if timeout is None:
            timeout = installed.settings.shutdown_timeout
        return await installed.flush(timeout)
    client, _default = _default, None
    return None if client is None else await client.aclose(timeout)


_Saved = tuple[AsyncClient | None, AsyncClient | None]


def _install(client: AsyncClient) -> _Saved:
    """Make ``client`` the default client, kept by init() and shutdown(), until
    ``_restore()`` gets what this returns (the default client set aside); for whisperr.testing."""
    global _default, _installed
    saved = (_default, _installed)
    _default = _installed = client
    return saved


def _restore(saved: _Saved) -> None:
    """Put back the default client ``_install()`` set aside."""
    global _default, _installed
    _default, _installed = saved
