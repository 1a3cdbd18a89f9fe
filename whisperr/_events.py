"""Capture-time validation and the JSON encoding of events and identifies (orjson lives here)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
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
MAX_PAST = 30 * 86400.0
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
    """Return ``value`` if it is a non-empty string, else raise."""
    if not isinstance(value, str) or not value:
        raise InvalidEventError("external_user_id", f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_USER_ID:
        raise InvalidEventError("external_user_id", f"must be at most {MAX_USER_ID} characters")
    _check_utf8("external_user_id", value)
    return value


def _check_utf8(field: str, value: str) -> None:
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidEventError(field, "must be valid Unicode (no lone surrogates)") from None


def check_event_type(value: object) -> str:
    """Return ``value`` if it is lowercase snake_case, else raise."""
    if not isinstance(value, str) or _EVENT_TYPE.fullmatch(value) is None:
        raise InvalidEventError(
            "event_type",
            f"must match ^[a-z0-9]+(?:_[a-z0-9]+)*$ (lowercase snake_case, e.g. 'payment_failed'),"
            f" got {value!r}",
        )
    return value


def encode_object(field: str, value: object) -> bytes:
    """Encode a mapping to JSON now, so later mutation by the caller cannot change it."""
    if type(value) is not dict:
        if not isinstance(value, Mapping):
            raise InvalidEventError(field, f"must be a mapping (dict), got {type(value).__name__}")
        value = dict(value)
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidEventError(field, f"must be JSON-serializable: {exc}") from None
    # orjson's result keeps its 4 KiB work buffer; a queued copy of the exact size takes ~100 B.
    return b"%b" % encoded


def base_context(sdk_name: str, sdk_version: str, app_version: str | None) -> dict[str, str]:
    """The context keys every event carries, as the official SDK sends them."""
    context = {"sdk_name": sdk_name, "sdk_version": sdk_version}
    if app_version and app_version.strip():
        context["app_version"] = app_version.strip()
    return context


def encode_context(context: object, base: Mapping[str, str]) -> tuple[bytes, str | None]:
    """Merge the caller's context over ``base``; return it encoded and any ``$message_id``."""
    if not isinstance(context, Mapping):
        raise InvalidEventError(
            "context", f"must be a mapping (dict), got {type(context).__name__}"
        )
    merged = {**base, **context}
    message_id = merged.pop("$message_id", None)
    if message_id is not None:
        message_id = check_message_id(message_id, "context.$message_id")
    return encode_object("context", merged), message_id


def check_message_id(value: object, field: str = "message_id") -> str:
    """Return a caller-supplied idempotency key if it follows the rules, else raise."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise InvalidEventError(
            field, f"must be a non-empty string without outer spaces, got {value!r}"
        )
    if len(value) > MAX_MESSAGE_ID:
        raise InvalidEventError(field, f"must be at most {MAX_MESSAGE_ID} characters")
    _check_utf8(field, value)
    return value


# Message ids are made 256 at a time from one read of the OS's random source: unlike the
# random module they cannot repeat after random.seed(); the buffer is emptied in a forked child.
ready_ids: list[str] = []


# The version (4) and variant (10xx) bits of a UUID, set by byte translation tables; the hex
# digits are then cut into 8-4-4-4-12 groups by one regex pass over the whole buffer.
_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))
_UUID_GROUPS = re.compile(r"(.{8})(.{4})(.{4})(.{4})(.{12})")


def new_message_id() -> str:
    """A random (version 4) UUID string."""
    try:
        return ready_ids.pop()
    except IndexError:
        raw = bytearray(os.urandom(16 * 256))
        raw[6::16] = raw[6::16].translate(_VERSION)
        raw[8::16] = raw[8::16].translate(_VARIANT)
        ready_ids.extend(map("-".join, _UUID_GROUPS.findall(raw.hex())))
        return ready_ids.pop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ready_ids.clear)


def parse_occurred_at(value: object, now: float) -> float:
    """Turn an aware datetime or RFC 3339 string into epoch seconds inside the server's window."""
    if isinstance(value, str):
        value = _parse_rfc3339(value)
    if not isinstance(value, datetime):
        raise InvalidEventError(
            "occurred_at",
            f"must be an aware datetime or RFC 3339 string, got {type(value).__name__}",
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidEventError(
            "occurred_at", "must be timezone-aware (a naive datetime is ambiguous)"
        )
    stamp = value.timestamp()
    if stamp > now + MAX_FUTURE:
        raise InvalidEventError("occurred_at", "must not be more than 5 minutes in the future")
    if stamp < now - MAX_PAST:
        raise InvalidEventError("occurred_at", "must not be more than 30 days in the past")
    return stamp


def _parse_rfc3339(value: str) -> datetime:
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidEventError(
            "occurred_at", f"must be an RFC 3339 timestamp with an offset, got {value!r}"
        )
    date, clock, fraction, offset = match.groups()
    # datetime.fromisoformat() of Python 3.10 takes only 3 or 6 fractional digits and no "Z".
    micros = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if offset in "Zz" else offset
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{micros}{offset}")
    except ValueError:
        raise InvalidEventError("occurred_at", f"is not a real date and time: {value!r}") from None


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
    return rejected if isinstance(rejected, int) and rejected > 0 else 0


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
        if preferred_channel not in CHANNEL_TYPES:
            raise InvalidEventError(
                "preferred_channel", f"must be one of email, sms, push, got {preferred_channel!r}"
            )
        body["preferred_channel"] = preferred_channel
    wire = [_channel(i, c) for i, c in enumerate(_sequence("channels", channels))]
    for kind, address in shortcuts:
        if address is not None:
            wire.append(_channel(len(wire), {"channel": kind, "address": address}))
    if len(wire) > MAX_CHANNELS:
        raise InvalidEventError("channels", f"must hold at most {MAX_CHANNELS} channels")
    if wire:
        body["channels"] = wire
    return b"%b" % orjson.dumps(body)


def _sequence(field: str, value: object) -> Sequence[object]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidEventError(field, f"must be a list, got {type(value).__name__}")
    return value


def _channel(index: int, spec: object) -> dict[str, object]:
    field = f"channels[{index}]"
    if not isinstance(spec, Mapping):
        raise InvalidEventError(field, f"must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - {"channel", "type", "address", "opted_in", "verified"}
    if unknown:
        raise InvalidEventError(field, f"has unknown keys {sorted(map(str, unknown))}")
    kind = spec.get("channel", spec.get("type"))
    if kind not in CHANNEL_TYPES:
        raise InvalidEventError(
            f"{field}.channel", f"must be one of email, sms, push, got {kind!r}"
        )
    address = spec.get("address")
    if not isinstance(address, str) or not address.strip():
        raise InvalidEventError(f"{field}.address", f"must be a non-empty string, got {address!r}")
    wire: dict[str, object] = {"channel": kind, "address": address}
    for flag, default in (("opted_in", True), ("verified", None)):
        value = spec.get(flag, default)
        if value is not None and not isinstance(value, bool):
            raise InvalidEventError(f"{field}.{flag}", f"must be a bool, got {value!r}")
        if value is not None:
            wire[flag] = value
    return wire
