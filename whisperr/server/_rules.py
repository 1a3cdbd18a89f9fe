"""The wire validation rules (WIRE.md sections 2 and 3): event, identify and channel checks."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import orjson

Problem = tuple[str, str]  # (where, rule); where is "" for the value itself
Check = Callable[[Any], "Problem | None"]  # returns None, or the first Problem it finds

INVALID: Any = object()  # stands for a body that is not (gzip-compressed) JSON
MAX_BATCH_EVENTS = 500
_EVENT_TYPE = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_MAX_AHEAD_SECONDS = 5 * 60.0
_MAX_BEHIND_SECONDS = 30 * 86400.0
_CHANNELS = ("email", "sms", "push")
_MAX_CHANNELS = 10
_MAX_TRAITS_BYTES = 50 * 1024


def batch_problem(data: Any) -> Problem | None:
    """Check a batch body's envelope; its events are checked one by one with `event_check`."""
    return _shape(data, _BATCH_CHECKS, ("events",))


def event_check(now: float) -> Check:
    """The check for one event, with `occurred_at` judged against `now` (epoch seconds)."""
    checks: dict[str, Check] = {
        **_EVENT_CHECKS,
        "occurred_at": functools.partial(_timestamp, now=now),
    }
    return functools.partial(_shape, checks=checks, required=_EVENT_REQUIRED)


def identify_problem(data: Any) -> Problem | None:
    """Check an identify body."""
    return _shape(data, _IDENTIFY_CHECKS, ("external_user_id",))


def located(where: str, problem: Problem | None) -> Problem | None:
    """Prefix a problem's location: `channels` + `[0].channel`, `context` + `$message_id`."""
    if problem is None:
        return None
    inner, rule = problem
    sep = "." if where and inner and not inner.startswith("[") else ""
    return (where + sep + inner, rule)


def _shape(value: Any, checks: Mapping[str, Check], required: Collection[str]) -> Problem | None:
    if value is INVALID:
        return ("", "must be valid JSON")
    if not isinstance(value, dict):
        return ("", "must be a JSON object")
    if unknown := [key for key in value if key not in checks]:
        return (unknown[0], "unknown field")
    if missing := [key for key in required if key not in value]:
        return (missing[0], "required field missing")
    for key, item in value.items():
        if problem := checks[key](item):
            return located(key, problem)
    return None


def _rule(ok: bool, rule: str) -> Problem | None:
    return None if ok else ("", rule)


def _text(value: Any) -> Problem | None:
    return _rule(isinstance(value, str) and value != "", "must be a non-empty string")


def _object(value: Any) -> Problem | None:
    return _rule(isinstance(value, dict), "must be a JSON object")


def _flag(value: Any) -> Problem | None:
    return _rule(isinstance(value, bool), "must be true or false")


def _channel_name(value: Any) -> Problem | None:
    return _rule(value in _CHANNELS, "must be one of email, sms, push")


def _event_type(value: Any) -> Problem | None:
    ok = isinstance(value, str) and _EVENT_TYPE.fullmatch(value) is not None
    return _rule(ok, "must be lowercase snake_case (^[a-z0-9]+(?:_[a-z0-9]+)*$)")


def _timestamp(value: Any, now: float) -> Problem | None:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        return ("", "must be RFC3339 UTC with exactly 3 fractional digits and a Z suffix")
    try:
        stamp = datetime.fromisoformat(value[:-1] + "+00:00").timestamp()
    except ValueError:
        return ("", "is not a valid date and time")
    if stamp > now + _MAX_AHEAD_SECONDS:
        return ("", "is more than 5 minutes ahead of the server clock")
    return _rule(stamp >= now - _MAX_BEHIND_SECONDS, "is more than 30 days in the past")


def _context(value: Any) -> Problem | None:
    if not isinstance(value, dict):
        return ("", "must be a JSON object")
    return located("$message_id", _text(value.get("$message_id")))


def _traits(value: Any) -> Problem | None:
    if not isinstance(value, dict):
        return ("", "must be a JSON object")
    return _rule(len(orjson.dumps(value)) <= _MAX_TRAITS_BYTES, "must be at most 50 KB as JSON")


def _channels(value: Any) -> Problem | None:
    if not isinstance(value, list) or len(value) > _MAX_CHANNELS:
        return ("", f"must be a list of at most {_MAX_CHANNELS} channels")
    for index, item in enumerate(value):
        if problem := _shape(item, _CHANNEL_CHECKS, _CHANNEL_REQUIRED):
            return located(f"[{index}]", problem)
    return None


def _events(value: Any) -> Problem | None:
    ok = isinstance(value, list) and 1 <= len(value) <= MAX_BATCH_EVENTS
    return _rule(ok, f"must be a list of 1 to {MAX_BATCH_EVENTS} events")


_CHANNEL_CHECKS: dict[str, Check] = {
    "channel": _channel_name,
    "address": _text,
    "opted_in": _flag,
    "verified": _flag,
}
_CHANNEL_REQUIRED = ("channel", "address", "opted_in")
_USER_CHECKS: dict[str, Check] = {"channels": _channels, "preferred_channel": _channel_name}
_IDENTIFY_CHECKS: dict[str, Check] = {"external_user_id": _text, "traits": _traits, **_USER_CHECKS}
_BATCH_CHECKS: dict[str, Check] = {"events": _events}
_EVENT_REQUIRED = ("external_user_id", "event_type", "occurred_at", "properties", "context")
_EVENT_CHECKS: dict[str, Check] = {
    "external_user_id": _text,
    "event_type": _event_type,
    "occurred_at": _text,  # replaced per request by a check against the server clock
    "properties": _object,
    "context": _context,
    "user": functools.partial(_shape, checks=_USER_CHECKS, required=()),
}
