"""The exceptions whisperr raises.

    WhisperrError
    ├── ConfigError          (also a ValueError): a setting is invalid
    ├── InvalidEventError    (also a ValueError): an event or identify call breaks a rule
    ├── ClientClosedError    (also a RuntimeError): the client was used after aclose()
    └── SendError            a ``send()`` or ``identify_now()`` did not land

Failures to deliver queued events never raise into the caller: they are counted in ``stats()``
and handed to the ``on_error`` hook as :class:`whisperr.DeliveryReport` values. Only the calls
that deliver now and are awaited raise :class:`SendError`.
"""

from __future__ import annotations

import functools
from typing import Any


class WhisperrError(Exception):
    """The root of every exception whisperr raises."""


class ConfigError(WhisperrError, ValueError):
    """A setting has a value it cannot take."""


class InvalidEventError(WhisperrError, ValueError):
    """An event or identify call breaks a rule of the ingestion contract.

    The message names the field and the rule; the event was not queued.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:  # pickle (multiprocessing, Celery): the real args
        return type(self), (self.field, self.rule)


class ClientClosedError(WhisperrError, RuntimeError):
    """The client is closed (or closing) and takes no more events."""


class SendError(WhisperrError):
    """A ``send()`` or ``identify_now()`` did not land; the caller may try again.

    Attributes:
        message_id: the event's ``$message_id`` (``""`` for an identify): send it again with
            ``message_id=`` and the server stores it once.
        status: the HTTP status of the last answer, or None when there was none.
        code: the server's error code (``"invalid_request"``, ...), when it sent a safe token.
        retryable: True when a later attempt may succeed (429, 5xx, network, timeout, the
            client closing); False for a refused key and other 4xx.
        attempts: how many requests were made.
    """

    def __init__(
        self,
        message: str,
        *,
        message_id: str,
        status: int | None,
        code: str | None,
        retryable: bool,
        attempts: int,
    ) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.status = status
        self.code = code
        self.retryable = retryable
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:  # pickle: rebuilt with its keyword arguments
        return functools.partial(type(self), *self.args, **vars(self)), ()
