"""Sends: one event (or identify) delivered now, alone, with a receipt or a :class:`SendError`.

A :class:`SendJob` is made on the caller's path (validated and encoded as ``track()`` does),
handed to the runner, which makes its requests over the client's pool in whatever host serves
(so a send works from any loop or thread), and waited for by the caller. The job's deadline is
fixed when it is made: every attempt, and every wait between attempts, fits before it.

Lifetime: one per call.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import orjson

from ._errors import SendError
from ._models import Receipt
from ._signal import Signal
from ._transport import Outcome

# How long the caller waits past the job's own deadline for the runner to report it: the
# runner's host may be busy, or be starting.
REPORT_GRACE = 1.0
_SAFE_CODE = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}", re.IGNORECASE)


@attrs.define(eq=False)
class SendJob:
    """One send: its body, its endpoint (``identify``), its deadline and, once done, its end."""

    body: bytes
    message_id: str
    identify: bool
    deadline: float  # time.monotonic()
    done: Signal = attrs.field(factory=Signal)
    receipt: Receipt | None = None
    error: SendError | None = None

    @classmethod
    def make(cls, body: bytes, message_id: str, *, identify: bool, timeout: float) -> SendJob:
        return cls(body, message_id, identify, time.monotonic() + timeout)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def succeed(self, outcome: Outcome, attempts: int) -> None:
        if not self.done.is_set():  # else its caller was told already (failed, or no answer)
            self.receipt = receipt(self.message_id, outcome, attempts)
            self.done.set()

    def fail(self, error: SendError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def result(self) -> Receipt:
        """The receipt, or raise the job's :class:`SendError`."""
        if self.error is not None:
            raise self.error
        assert self.receipt is not None
        return self.receipt

    def error_from(self, outcome: Outcome, attempts: int, why: str = "") -> SendError:
        """The error for a job whose last attempt met ``outcome``."""
        code = error_code(outcome.answer)
        message = f"{'identify' if self.identify else 'the event'} did not land: {outcome.message}"
        if code is not None:
            message += f" ({code})"
        return SendError(
            message + why,
            message_id=self.message_id,
            status=outcome.status,
            code=code,
            retryable=outcome.kind == "retry",
            attempts=attempts,
        )

    def stopped(self, why: str, attempts: int) -> SendError:
        """The error for a job ended by the client or its host, not by an answer."""
        return SendError(
            why, message_id=self.message_id, status=None, code=None, retryable=True,
            attempts=attempts,
        )  # fmt: skip


def receipt(message_id: str, outcome: Outcome, attempts: int) -> Receipt:
    """A receipt from a 2xx answer, read leniently: what is missing or mistyped is None."""
    answer = _json_object(outcome.answer)
    event, delivery = _object(answer, "event"), _object(answer, "delivery")
    duplicate = delivery.get("duplicate")
    return Receipt(
        message_id=message_id,
        sent=True,
        status=outcome.status,
        attempts=attempts,
        event_id=_id(event, "id"),
        mapping_status=_text(event, "mapping_status"),
        processing=_text(answer, "processing"),
        delivery_id=_id(delivery, "delivery_id"),
        disposition=_text(delivery, "disposition"),
        duplicate=duplicate if type(duplicate) is bool else None,
        answer=MappingProxyType(answer),
    )


def not_sent(message_id: str) -> Receipt:
    """The receipt of a send by a ``disabled`` client: validated, never sent."""
    return Receipt(message_id=message_id, sent=False, status=None, attempts=0)


def error_code(answer: bytes) -> str | None:
    """``error.code`` of an error answer, when it is a short token safe to show and log."""
    code = _object(_json_object(answer), "error").get("code")
    if isinstance(code, str) and _SAFE_CODE.fullmatch(code):
        return code
    return None


def _json_object(content: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _object(mapping: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _text(mapping: Mapping[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) else None


def _id(mapping: Mapping[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    if type(value) is int:
        return str(value)  # an id given as a number
    return value if isinstance(value, str) else None
