"""What runs on the caller's path before an event is validated: ``before_send``, the PII guard.

Lifetime: one per client, made only when ``before_send`` or ``pii`` is set (the client's
``track`` is then :meth:`Hooks.event` followed by the plain one; without them, ``track`` is
untouched). ``before_send`` sees the event as a mapping with the wire's keys and returns it,
changed or not, or None to drop it; what it returns is validated like any input. A hook that
raises, or returns something else, is logged and the event goes on as it came. The PII guard
(``pii="raise"`` or ``"drop_fields"``) then looks at the properties (and at identify's
traits, never its contact channels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from . import _events as ev
from . import _pii
from ._config import BeforeSend, Pii
from ._ledger import Ledger

logger = logging.getLogger("whisperr")

HOOK_LOG_EVERY = 60.0  # seconds between two logs of a before_send that keeps failing
_LOGGED_FIELDS_CAP = 1000  # field paths drop_fields logs once each

# external_user_id, event_type, properties, context, occurred_at, message_id: track's arguments
Args = tuple[Any, Any, Any, Any, Any, Any]


class Hooks:
    """``before_send`` and the PII guard of one client; safe from any thread."""

    def __init__(
        self, before_send: BeforeSend | None, pii: Pii | None, ledger: Ledger, clock: Any
    ) -> None:
        self._before_send = before_send
        self._pii = pii
        self._ledger = ledger
        self._clock = clock
        self._hook_failures = 0
        self._hook_logged_at = -HOOK_LOG_EVERY
        self._logged_fields: set[str] = set()

    def event(self, *args: Any, count_drop: bool = True) -> tuple[Args | None, str]:
        """Track's arguments after the hooks; or None and the ``$message_id`` of the event,
        when ``before_send`` dropped it (counted as ``filtered`` if ``count_drop``: a send's
        caller has the answer, and sends are counted apart).

        Raises:
            InvalidEventError: ``properties`` or ``context`` cannot be read as a mapping, or,
                with ``pii="raise"``, a property looks like contact details.
        """
        uid, event_type, properties, context, occurred_at, message_id = args
        if self._before_send is not None:
            # Read the caller's mappings once, as validation would: a read that fails is bad
            # input, named; the hook gets shallow copies.
            shown_properties = {} if properties is None else _readable("properties", properties)
            shown_context = {} if context is None else _readable("context", context)
            if message_id is None:
                given = (
                    shown_context.get("$message_id") if isinstance(shown_context, dict) else None
                )
                message_id = given if given is not None else ev.new_message_id()
            stamp, shown = None, None
            if occurred_at is None:
                stamp = self._clock()
                occurred_at = shown = ev.format_timestamp(stamp)
            if isinstance(shown_context, dict):
                shown_context["$message_id"] = message_id
            changed = self._run_before_send(
                {
                    "external_user_id": uid,
                    "event_type": event_type,
                    "occurred_at": occurred_at,
                    "properties": shown_properties,
                    "context": shown_context,  # not a mapping: validation says so after
                }
            )
            if changed is _DROPPED:
                if count_drop:
                    self._ledger.filtered()
                return None, str(message_id)
            if changed is not None:
                uid, event_type, properties, context, occurred_at = changed
                message_id = None  # carried in the context, where the hook may have changed it
                if type(context) is dict and len(context) == 1:
                    # Only the message id: the plain path takes it as message_id, faster.
                    message_id = context.get("$message_id")
                    context = None if message_id is not None else context
            if stamp is not None and (occurred_at is shown or occurred_at == shown):
                occurred_at = ev.CaptureStamp(stamp)  # not parsed again: the capture time
        if self._pii is not None and isinstance(properties, Mapping):
            properties = self.guard("properties", properties)
        return (uid, event_type, properties, context, occurred_at, message_id), ""

    def guard(self, where: str, values: Mapping[str, Any]) -> Mapping[str, Any]:
        """``values`` after the PII guard (the same object when nothing looks like contact
        details); fields removed by ``drop_fields`` are logged once per field path."""
        if self._pii is None:
            return values
        kept, removed = _pii.guard(where, values, self._pii)
        for path in removed:
            if path not in self._logged_fields and len(self._logged_fields) < _LOGGED_FIELDS_CAP:
                self._logged_fields.add(path)
                logger.warning(
                    "whisperr: %s looked like contact details and was removed (pii=%r); this "
                    "is logged once per field",
                    path,
                    self._pii,
                )
        return kept

    def _run_before_send(self, event: dict[str, Any]) -> Any:
        """What the hook made of ``event``: its five fields read back (as for track's
        arguments), ``_DROPPED`` for None, or None when it failed (the event goes on as it
        came)."""
        assert self._before_send is not None
        try:
            result = self._before_send(event)
        except Exception:
            self._hook_failed("raised", exc_info=True)
            return None
        if result is None:
            return _DROPPED
        if not isinstance(result, Mapping):
            self._hook_failed(f"returned a {type(result).__name__}, not a mapping or None")
            return None
        try:  # the hook's own mapping: a read that fails is the hook failing
            return tuple(
                result.get(key)
                for key in (
                    "external_user_id",
                    "event_type",
                    "properties",
                    "context",
                    "occurred_at",
                )
            )
        except Exception:
            self._hook_failed("returned a mapping that could not be read", exc_info=True)
            return None

    def _hook_failed(self, what: str, *, exc_info: bool = False) -> None:
        self._hook_failures += 1
        now = time.monotonic()
        if now - self._hook_logged_at < HOOK_LOG_EVERY:
            return
        self._hook_logged_at = now
        logger.error(
            "whisperr: before_send %s; the event is kept as it came (failures so far: %d; "
            "logged at most once a minute)",
            what,
            self._hook_failures,
            exc_info=exc_info,
        )


_DROPPED: Any = object()  # before_send returned None


def _readable(field: str, value: Any) -> Any:
    """A shallow dict copy of a mapping, for the hook to change (a read that fails raises
    :class:`InvalidEventError` naming ``field``); anything else as it is."""
    return ev.as_dict(field, value) if isinstance(value, Mapping) else value
