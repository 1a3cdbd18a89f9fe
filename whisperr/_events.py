"""Capture-time validation and the JSON encoding of events and identifies (orjson lives here)."""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from datetime import time as time_of_day
from functools import lru_cache
from typing import Any

import orjson

from ._errors import InvalidEventError

# The event_type rule of the ingestion API; fullmatch, so a trailing newline does not slip by.
_EVENT_TYPE = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
# RFC 3339 date-time with a mandatory offset; fractional digits are optional.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)
MAX_FUTURE = 5 * 60.0
# Accepted at capture but more than 4 minutes ahead, a stamp would be refused by a server whose
# clock runs a minute behind ours: the same margin the send side keeps at the 30-day edge.
FUTURE_MARGIN = 60.0
MAX_PAST = 30 * 86400.0
MAX_EVENT_TYPE = 255
MAX_MESSAGE_ID = 200
MAX_USER_ID = 1000  # not published by the API; long enough for any id, short enough to batch
MAX_TRAITS_BYTES = 50_000
MAX_CHANNELS = 10
CHANNEL_TYPES = frozenset({"email", "sms", "push"})

# What the client keeps per queued message, captured at track()/identify() time:
# (external_user_id, event_type or None for an identify, occurred_at as epoch seconds,
#  encoded properties (or the whole identify body), message id[, encoded context]).
# The context is there only when the caller passed one: a tuple a slot shorter is 16 bytes
# smaller, which is 6% of a queued event.
Item = tuple[str, str | None, float, bytes, str] | tuple[str, str | None, float, bytes, str, bytes]


def check_user_id(value: object) -> str:
    """Return ``value`` as an exact ``str`` if it is a non-empty string, else raise."""
    text = _exact_str(value)
    if not text:
        raise InvalidEventError(
            "external_user_id", f"must be a non-empty string, got {_show(value)}"
        )
    if len(text) > MAX_USER_ID:
        raise InvalidEventError("external_user_id", f"must be at most {MAX_USER_ID} characters")
    _check_utf8("external_user_id", text)
    return text


def _exact_str(value: object) -> str | None:
    """``value`` as an exact ``str``, or None when it is not a string.

    A subclass instance (an ``enum.StrEnum`` member, say) gives a plain copy of its characters,
    so its own ``__eq__``, ``__len__``, ``strip`` or ``encode`` never decide a check. The test is
    on ``type(value)``: ``isinstance`` believes an object whose ``__class__`` claims ``str``.
    """
    if type(value) is str:
        return value
    if issubclass(type(value), str):
        return str.__str__(value)  # a real subclass (isinstance() may be told otherwise)
    return None


def _show(value: object) -> str:
    """``repr(value)`` for an error message: cut to 120 characters, and never raising."""
    try:
        text = str.__str__(repr(value))
    except Exception:
        return f"<unprintable {_kind(value)}>"
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(value: object) -> str:
    """The name of ``value``'s type for an error message, never raising."""
    try:
        return str.__str__(type(value).__name__)
    except Exception:
        return "object"


def _describe(exc: Exception) -> str:
    """An exception raised by the caller's object, for an error message; never raising."""
    try:
        text = str.__str__(f"{_kind(exc)}: {exc}")
    except Exception:
        return _kind(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_utf8(field: str, value: str) -> None:
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidEventError(field, "must be valid Unicode (no lone surrogates)") from None


def check_event_type(value: object) -> str:
    """Return ``value`` as an exact ``str`` if it is lowercase snake_case, else raise.

    A ``str`` subclass (an ``enum.StrEnum`` member) is accepted: its characters are copied into
    a plain ``str`` and checked, and that copy is what the caller must keep.
    """
    text = _exact_str(value)
    if text is not None and len(text) > MAX_EVENT_TYPE:
        raise InvalidEventError("event_type", f"must be at most {MAX_EVENT_TYPE} characters")
    if text is None or _EVENT_TYPE.fullmatch(text) is None:
        raise InvalidEventError(
            "event_type",
            f"must match ^[a-z0-9]+(?:_[a-z0-9]+)*$ (lowercase snake_case, e.g. 'payment_failed'),"
            f" got {_show(value)}",
        )
    return text


# orjson encodes dates and times natively, but a datetime whose tzinfo raises crashes the whole
# process inside orjson (3.13); they are passed to ``encode_time`` instead, which writes them as
# orjson does (ISO 8601, what ``isoformat()`` gives) and turns a raising tzinfo into an error.
USER_JSON = orjson.OPT_PASSTHROUGH_DATETIME


def encode_time(value: object) -> str:
    """orjson's ``default`` for the caller's values: dates and times; the rest is refused."""
    if isinstance(value, (datetime, date, time_of_day)):
        try:
            return value.isoformat()
        except Exception as exc:
            raise TypeError(f"{type(value).__name__} could not be read: {_describe(exc)}") from None
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def encode_object(field: str, value: object) -> bytes:
    """Encode a mapping to JSON now, so later mutation by the caller cannot change it."""
    if type(value) is not dict:
        value = as_dict(field, value)
    try:
        encoded = orjson.dumps(value, encode_time, USER_JSON)
    except Exception as exc:  # orjson.JSONEncodeError is a TypeError; be safe with the rest
        # orjson names only the type; what encode_time said is the cause
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        raise InvalidEventError(field, f"must be JSON-serializable: {_describe(cause)}") from None
    # orjson's result keeps its 4 KiB work buffer; a queued copy of the exact size takes ~100 B.
    return b"%b" % encoded


def as_dict(field: str, value: object) -> dict[Any, Any]:
    """A plain ``dict`` copy of a mapping, else raise naming ``field``.

    Reading a mapping runs the caller's code (``keys``, ``__iter__``, ``__getitem__``; a
    ``UserDict`` changed by another thread meanwhile raises ``RuntimeError``): whatever it
    raises is bad input, reported as :class:`InvalidEventError`.
    """
    try:
        if isinstance(value, Mapping):
            return dict(value)
    except Exception as exc:
        raise InvalidEventError(
            field, f"could not be read as a mapping: {_describe(exc)}"
        ) from None
    raise InvalidEventError(field, f"must be a mapping (dict), got {_kind(value)}")


def base_context(sdk_name: str, sdk_version: str, app_version: str | None) -> dict[str, str]:
    """The context keys every event carries, as the official SDK sends them."""
    context = {"sdk_name": sdk_name, "sdk_version": sdk_version}
    if app_version and app_version.strip():
        context["app_version"] = app_version.strip()
    return context


def encode_context(context: object, base: Mapping[str, str]) -> tuple[bytes, str | None]:
    """Merge the caller's context over ``base``; return it encoded and any ``$message_id``."""
    own = context if type(context) is dict else as_dict("context", context)
    try:  # a key's own __eq__, or another thread changing the caller's dict meanwhile
        merged = {**base, **own}
        message_id = merged.pop("$message_id", None)
    except Exception as exc:
        raise InvalidEventError(
            "context", f"could not be read as a mapping: {_describe(exc)}"
        ) from None
    if message_id is not None:
        message_id = check_message_id(message_id, "context.$message_id")
    return encode_object("context", merged), message_id


def check_message_id(value: object, field: str = "message_id") -> str:
    """Return a caller-supplied idempotency key, as an exact ``str``, if it follows the rules."""
    text = _exact_str(value)
    if not text or text != text.strip():
        raise InvalidEventError(
            field, f"must be a non-empty string without outer spaces, got {_show(value)}"
        )
    if len(text) > MAX_MESSAGE_ID:
        raise InvalidEventError(field, f"must be at most {MAX_MESSAGE_ID} characters")
    _check_utf8(field, text)
    return text


# Message ids are made in bulk from one read of the OS's random source (unlike the random
# module they cannot repeat after random.seed()); the pool is emptied in a forked child. The
# runner tops the pool up between batches (``top_up_ids``), off the callers' path; a caller
# that finds it empty (a burst faster than the runner runs) makes a few only.
ready_ids: list[str] = []
POOL_SIZE = 1024  # what top_up_ids() fills the pool to
_CALLER_REFILL = 16  # what a caller that found the pool empty makes (about 7 µs)
_RUNNER_REFILL = 256  # what the runner adds at most in one step


# The version (4) and variant (10xx) bits of a UUID, set by byte translation tables; the hex
# digits are then cut into 8-4-4-4-12 groups by one regex pass over the whole buffer.
_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))
_UUID_GROUPS = re.compile(r"(.{8})(.{4})(.{4})(.{4})(.{12})")


def _fresh_ids(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    return list(map("-".join, _UUID_GROUPS.findall(raw.hex())))


def new_message_id() -> str:
    """A random (version 4) UUID string; safe to call from any thread, never raising.

    ``ready_ids`` is shared and unlocked: a refill is made in a local list, the caller's id
    taken from that, and only the rest handed over, so other threads emptying ``ready_ids``
    meanwhile cannot leave this call without an id. (``ready_ids`` is never rebound: the
    client keeps its bound ``pop``.)
    """
    try:
        return ready_ids.pop()
    except IndexError:
        fresh = _fresh_ids(_CALLER_REFILL)
        mine = fresh.pop()
        ready_ids.extend(fresh)
        return mine


def top_up_ids() -> None:
    """Fill the pool towards ``POOL_SIZE`` (the runner, between batches) when it is below
    half, by at most ``_RUNNER_REFILL`` (about 90 µs) at a time: a step of the runner stays
    short."""
    missing = POOL_SIZE - len(ready_ids)
    if missing > POOL_SIZE // 2:
        ready_ids.extend(_fresh_ids(min(missing, _RUNNER_REFILL)))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ready_ids.clear)


class CaptureStamp(float):
    """A capture time (epoch seconds) taken already, by the hooks: used as it is."""

    __slots__ = ()


def parse_occurred_at(value: object, now: float) -> float:
    """Turn an aware datetime or RFC 3339 string into epoch seconds inside the server's window.

    The window is ``MAX_PAST`` back and ``MAX_FUTURE - FUTURE_MARGIN`` ahead of ``now``.
    """
    text = _exact_str(value)
    if text is not None:
        value = _parse_rfc3339(text)
    if not isinstance(value, datetime):
        raise InvalidEventError(
            "occurred_at",
            f"must be an aware datetime or RFC 3339 string, got {_kind(value)}",
        )
    try:  # a tzinfo's utcoffset() and a subclass's timestamp() are the caller's code
        aware = value.tzinfo is not None and value.utcoffset() is not None
        stamp = float(value.timestamp()) if aware else 0.0
    except Exception as exc:
        raise InvalidEventError(
            "occurred_at", f"could not be read as a date and time: {_describe(exc)}"
        ) from None
    if not aware:
        raise InvalidEventError(
            "occurred_at", "must be timezone-aware (a naive datetime is ambiguous)"
        )
    if not math.isfinite(stamp):
        raise InvalidEventError("occurred_at", f"is not a real date and time: {stamp!r}")
    if stamp > now + (MAX_FUTURE - FUTURE_MARGIN):
        raise InvalidEventError("occurred_at", "must not be more than 4 minutes in the future")
    if stamp < now - MAX_PAST:
        raise InvalidEventError("occurred_at", "must not be more than 30 days in the past")
    return stamp


def _parse_rfc3339(value: str) -> datetime:
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidEventError(
            "occurred_at", f"must be an RFC 3339 timestamp with an offset, got {_show(value)}"
        )
    date, clock, fraction, offset = match.groups()
    # datetime.fromisoformat() of Python 3.10 takes only 3 or 6 fractional digits and no "Z".
    micros = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if offset in "Zz" else offset
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{micros}{offset}")
    except ValueError:
        raise InvalidEventError(
            "occurred_at", f"is not a real date and time: {_show(value)}"
        ) from None


@lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _milliseconds(stamp: float) -> int:
    # Rounding to the microsecond first keeps an exact .123 from truncating to .122.
    return round(stamp * 1_000_000) // 1000


def format_timestamp(stamp: float) -> str:
    """RFC 3339 in UTC with milliseconds (truncated, not rounded) and ``Z``."""
    seconds, millis = divmod(_milliseconds(stamp), 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


def millisecond_window(stamp: float) -> tuple[float, float]:
    """The stamps that format to the same millisecond as ``stamp``: [start, end)."""
    millis = _milliseconds(stamp)
    return (millis * 1000 - 0.5) / 1e6, ((millis + 1) * 1000 - 0.5) / 1e6


# Events tracked in a burst share their stamp (see AsyncClient._share): encode each one once.
_stamps: dict[float, bytes] = {}


def _cache_stamp(stamp: float) -> bytes:
    """Encode a stamp missing from ``_stamps`` and keep it there (a bounded cache)."""
    if len(_stamps) > 4096:
        _stamps.clear()
    encoded = _stamps[stamp] = format_timestamp(stamp).encode()
    return encoded


_EVENT = (
    b'{"external_user_id":%b,"event_type":"%b","occurred_at":"%b","properties":%b,'
    b'"context":{"$message_id":%b%b}'
)


def context_tail(context: bytes) -> bytes:
    """What follows the message id in an event's context: ``context`` encoded, minus its ``{``."""
    return b"}" if context == b"{}" else b"," + context[1:]


def encode_event(item: Item, base_tail: bytes) -> bytes:
    """The wire form of one queued track event, assembled from the pieces encoded at capture.

    ``base_tail`` is the :func:`context_tail` of the SDK's context, for events without their own.
    """
    if len(item) == 5:
        user_id, event_type, stamp, properties, message_id = item
        tail = base_tail
    else:
        user_id, event_type, stamp, properties, message_id, context = item
        tail = context_tail(context)
    try:
        occurred_at = _stamps[stamp]
    except KeyError:
        occurred_at = _cache_stamp(stamp)
    return _EVENT % (
        orjson.dumps(user_id),
        event_type.encode(),  # type: ignore[union-attr]  # validated: [a-z0-9_]+
        occurred_at,
        properties,
        orjson.dumps(message_id),
        tail,
    )


def encode_base_context(base: Mapping[str, str]) -> bytes:
    """Encode the SDK's own context once, for events tracked without a context."""
    return orjson.dumps(dict(base))


def batch_body(events: Sequence[bytes]) -> bytes:
    """The body of ``POST /v1/events/batch`` from already encoded events."""
    return b'{"events":[' + b",".join(events) + b"]}"


def rejected_count(content: bytes) -> int:
    """How many events a 2xx batch answer says it rejected; 0 when the body says nothing."""
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return 0
    rejected = answer.get("rejected") if isinstance(answer, dict) else None
    # type(), not isinstance(): true is an int too, and {"rejected": true} counts nothing.
    return rejected if type(rejected) is int and rejected > 0 else 0


def encode_identify(
    user_id: object,
    traits: object,
    preferred_channel: object,
    channels: object,
    shortcuts: Sequence[tuple[str, object]],
) -> bytes:
    """Validate an identify call and return its wire body."""
    body: dict[str, Any] = {"external_user_id": check_user_id(user_id)}
    if traits is not None:
        encoded = encode_object("traits", traits)
        if len(encoded) > MAX_TRAITS_BYTES:
            raise InvalidEventError("traits", f"must encode to at most {MAX_TRAITS_BYTES} bytes")
        if encoded != b"{}":
            body["traits"] = orjson.Fragment(encoded)
    if preferred_channel is not None:
        preferred = _exact_str(preferred_channel)
        if preferred not in CHANNEL_TYPES:
            raise InvalidEventError(
                "preferred_channel",
                f"must be one of email, sms, push, got {_show(preferred_channel)}",
            )
        body["preferred_channel"] = preferred
    wire = [_channel(i, c) for i, c in enumerate(_sequence("channels", channels))]
    for kind, address in shortcuts:
        if address is not None:
            wire.append(_channel(len(wire), {"channel": kind, "address": address}))
    if len(wire) > MAX_CHANNELS:
        raise InvalidEventError("channels", f"must hold at most {MAX_CHANNELS} channels")
    if wire:
        body["channels"] = wire
    return b"%b" % orjson.dumps(body)


def _sequence(field: str, value: object) -> list[object]:
    """The items of a list argument, read once (at most one past ``MAX_CHANNELS``)."""
    if value is None:
        return []
    try:
        if not isinstance(value, (str, bytes)) and isinstance(value, Sequence):
            return list(itertools.islice(value, MAX_CHANNELS + 1))
    except Exception as exc:  # the caller's __iter__ or __getitem__
        raise InvalidEventError(field, f"could not be read as a list: {_describe(exc)}") from None
    raise InvalidEventError(field, f"must be a list, got {_kind(value)}")


_CHANNEL_KEYS = frozenset({"channel", "type", "address", "opted_in", "verified"})


def _channel(index: int, spec: object) -> dict[str, object]:
    field = f"channels[{index}]"
    if type(spec) is not dict:
        spec = as_dict(field, spec)
    try:  # another thread may change the caller's dict meanwhile
        pairs = list(spec.items())
    except Exception as exc:
        raise InvalidEventError(
            field, f"could not be read as a mapping: {_describe(exc)}"
        ) from None
    unknown = [key for key, _ in pairs if _exact_str(key) not in _CHANNEL_KEYS]
    if unknown:
        raise InvalidEventError(
            field, f"has unknown keys [{', '.join(sorted(map(_show, unknown)))}]"
        )
    found = {_exact_str(key): value for key, value in pairs}
    given = found.get("channel", found.get("type"))
    kind = _exact_str(given)
    if kind not in CHANNEL_TYPES:
        raise InvalidEventError(
            f"{field}.channel", f"must be one of email, sms, push, got {_show(given)}"
        )
    given = found.get("address")
    address = _exact_str(given)
    if not address or not address.strip():
        raise InvalidEventError(
            f"{field}.address", f"must be a non-empty string, got {_show(given)}"
        )
    _check_utf8(f"{field}.address", address)
    wire: dict[str, object] = {"channel": kind, "address": address}
    for flag, default in (("opted_in", True), ("verified", None)):
        value = found.get(flag, default)
        if value is not None and type(value) is not bool:
            raise InvalidEventError(f"{field}.{flag}", f"must be a bool, got {_show(value)}")
        if value is not None:
            wire[flag] = value
    return wire
