"""The exceptions whisperr raises.

    WhisperrError
    ├── ConfigError          (also a ValueError): a setting is invalid
    ├── InvalidEventError    (also a ValueError): an event or identify call breaks a rule
    └── ClientClosedError    (also a RuntimeError): the client was used after aclose()

Delivery failures never raise into the caller: they are counted in ``stats()`` and handed to the
``on_error`` hook as :class:`whisperr.DeliveryReport` values.
"""

from __future__ import annotations


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


class ClientClosedError(WhisperrError, RuntimeError):
    """The client is closed (or closing) and takes no more events."""
