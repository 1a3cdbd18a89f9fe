"""Whisperr: the official SDK's client (``whisperr==0.2.1``), on this SDK's engine.

Code written for the official SDK keeps working when the requirement line changes: the same
constructor (a positional key, the same keywords), the same methods, the same ``on_error``
report attributes (``type``, ``message``, ``status``). What differs, and why, is in the
README's migration section.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, final

import httpx

from ._config import OnError
from ._errors import ConfigError
from ._models import FlushResult, Receipt, Stats
from ._scope import UserTracker, current_scope
from ._sync import Client

logger = logging.getLogger("whisperr")
_debug_handler: logging.Handler | None = None


@final
class Whisperr:
    """The official SDK's ``Whisperr`` client: a :class:`Client` under the official names.

    ``track()`` and ``identify()`` never block; delivery runs on the client's own thread and
    ``shutdown()`` (also at exit) delivers what is left. Any other :class:`Settings` field
    may be passed as a keyword too.

    Args:
        api_key: the app's ingestion key (``wrk_...``); ``WHISPERR_API_KEY`` when omitted.
        flush_at: send a batch once this many events are queued (default: a full batch; a
            partial one goes after ``flush_interval``).
        debug: log the client's activity (the ``whisperr`` logger, at DEBUG) to stderr.
        transport: an ``httpx`` transport; the official SDK's ``Transport`` has no
            counterpart here (``base_url``, ``proxy`` and ``verify`` configure ours).

    Raises:
        ConfigError: a setting is invalid (it is a ``ValueError``, as the official raises).
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        app_version: str | None = None,
        flush_at: int | None = None,
        flush_interval: float | None = None,
        max_queue_size: int | None = None,
        max_batch_size: int | None = None,
        max_retries: int | None = None,
        request_timeout: float | None = None,
        disabled: bool | None = None,
        debug: bool = False,
        on_error: OnError | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **settings: Any,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigError(
                "transport must be an httpx.AsyncBaseTransport: the official SDK's Transport "
                "has no counterpart here; base_url, proxy and verify configure the default one"
            )
        given: dict[str, Any] = {
            "api_key": api_key,
            "base_url": base_url,
            "app_version": app_version,
            "flush_at": flush_at,
            "flush_interval": flush_interval,
            "max_queue_size": max_queue_size,
            "max_batch_size": max_batch_size,
            "max_retries": max_retries,
            "request_timeout": request_timeout,
            "disabled": disabled,
            "on_error": on_error,
            "transport": transport,
        }
        # What was not passed keeps this SDK's default (or its WHISPERR_* variable).
        self._client = Client(**{k: v for k, v in given.items() if v is not None}, **settings)
        if debug:
            _log_to_stderr()

    def __repr__(self) -> str:
        return f"<Whisperr {self._client.settings.base_url}>"

    @property
    def ready(self) -> bool:
        """True unless the client is ``disabled``."""
        return not self._client.settings.disabled

    @property
    def client(self) -> Client:
        """The :class:`Client` underneath, for this SDK's own API."""
        return self._client

    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
    ) -> str:
        """Queue an event; see :meth:`AsyncClient.track` (invalid input raises)."""
        return self._client.track(
            external_user_id, event_type, properties, context,
            occurred_at=occurred_at, message_id=message_id,
        )  # fmt: skip

    def identify(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Queue an identify; see :meth:`AsyncClient.identify`."""
        self._client.identify(
            external_user_id, traits, email=email, phone=phone, push_token=push_token,
            preferred_channel=preferred_channel, channels=channels,
        )  # fmt: skip

    def send(self, *args: Any, **kwargs: Any) -> Receipt:
        """Deliver one event now and block for its receipt; see :meth:`Client.send`."""
        return self._client.send(*args, **kwargs)

    def current(self) -> UserTracker:
        """``track()``/``identify()`` for the current request's user (see ``whisperr.bind``)."""
        return UserTracker(self, current_scope())

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Block until everything queued before the call is settled (or ``timeout`` passes)."""
        return self._client.flush(timeout)

    def shutdown(self, timeout: float | None = None) -> FlushResult:
        """Deliver what is queued within ``timeout`` (default ``shutdown_timeout``), then stop.
        Idempotent."""
        return self._client.close(timeout)

    def stats(self) -> Stats:
        """A frozen snapshot of the counters; see :meth:`AsyncClient.stats`."""
        return self._client.stats()

    def _drop_anonymous(self, event_type: object) -> None:
        self._client._drop_anonymous(event_type)


def _log_to_stderr() -> None:
    """``debug=True``: the ``whisperr`` logger's records, DEBUG and up, on stderr (once)."""
    global _debug_handler
    if _debug_handler is None:
        _debug_handler = logging.StreamHandler(sys.stderr)
        _debug_handler.setFormatter(logging.Formatter("[whisperr] %(levelname)s %(message)s"))
        logger.addHandler(_debug_handler)
    logger.setLevel(logging.DEBUG)
