"""Invalid input raises InvalidEventError at the call site, naming the field and the rule."""

from __future__ import annotations

import collections
import decimal
import enum
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest

import whisperr

from .conftest import API_KEY, NOW, Api

pytestmark = pytest.mark.anyio

UTC = timezone.utc
NOW_DT = datetime.fromtimestamp(NOW, UTC)


class Unserializable:
    pass


class Unreadable(Mapping[str, Any]):
    """A mapping whose every read fails, as a lazy or remote mapping's might."""

    def __getitem__(self, key: str) -> Any:
        raise ConnectionError("the backing store went away")

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1


class BrokenZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta:
        raise ValueError("no offset for you")


class Kind(str, enum.Enum):  # enum.StrEnum (Python 3.11+) behaves the same
    PAYMENT_FAILED = "payment_failed"


# (track arguments, the field named, a fragment of the rule)
INVALID_TRACKS: list[tuple[dict[str, Any], str, str]] = [
    ({"external_user_id": ""}, "external_user_id", "non-empty string"),
    ({"external_user_id": None}, "external_user_id", "non-empty string"),
    ({"external_user_id": 42}, "external_user_id", "non-empty string"),
    ({"external_user_id": "user_\ud800"}, "external_user_id", "lone surrogates"),
    ({"message_id": "id_\udfff"}, "message_id", "lone surrogates"),
    ({"context": {"$message_id": "\ud800"}}, "context.$message_id", "lone surrogates"),
    ({"event_type": "PaymentFailed"}, "event_type", "snake_case"),
    ({"event_type": "payment-failed"}, "event_type", "snake_case"),
    ({"event_type": "payment__failed"}, "event_type", "snake_case"),
    ({"event_type": "_payment"}, "event_type", "snake_case"),
    ({"event_type": "payment_"}, "event_type", "snake_case"),
    ({"event_type": "payment_failed\n"}, "event_type", "snake_case"),
    ({"event_type": ""}, "event_type", "snake_case"),
    ({"event_type": None}, "event_type", "snake_case"),
    ({"event_type": "a" * 256}, "event_type", "at most 255 characters"),
    ({"properties": [1, 2]}, "properties", "mapping"),
    ({"properties": "x"}, "properties", "mapping"),
    ({"properties": {"s": {1, 2}}}, "properties", "JSON-serializable"),
    ({"properties": {"o": Unserializable()}}, "properties", "JSON-serializable"),
    ({"properties": {1: "non-string key"}}, "properties", "JSON-serializable"),
    ({"properties": {"d": decimal.Decimal("1.5")}}, "properties", "JSON-serializable"),
    ({"properties": {"b": b"bytes"}}, "properties", "JSON-serializable"),
    ({"context": ["x"]}, "context", "mapping"),
    ({"context": {"o": Unserializable()}}, "context", "JSON-serializable"),
    ({"properties": Unreadable()}, "properties", "could not be read"),
    ({"context": Unreadable()}, "context", "could not be read"),
    ({"occurred_at": datetime(2026, 6, 14, 12, 0)}, "occurred_at", "timezone-aware"),
    ({"occurred_at": "2026-06-14T12:00:00"}, "occurred_at", "RFC 3339"),
    ({"occurred_at": "2026-06-14"}, "occurred_at", "RFC 3339"),
    ({"occurred_at": "yesterday"}, "occurred_at", "RFC 3339"),
    ({"occurred_at": "2026-02-30T12:00:00Z"}, "occurred_at", "not a real date"),
    ({"occurred_at": 1781438400}, "occurred_at", "aware datetime"),
    ({"occurred_at": NOW_DT + timedelta(minutes=5, seconds=1)}, "occurred_at", "future"),
    (
        {"occurred_at": NOW_DT + timedelta(minutes=4, milliseconds=1)},
        "occurred_at",
        "more than 4 minutes in the future",
    ),
    (
        {"occurred_at": datetime(2026, 6, 14, 12, tzinfo=BrokenZone())},
        "occurred_at",
        "could not be read",
    ),
    ({"occurred_at": NOW_DT - timedelta(days=30, seconds=1)}, "occurred_at", "30 days"),
    ({"message_id": ""}, "message_id", "non-empty"),
    ({"message_id": " padded "}, "message_id", "outer spaces"),
    ({"message_id": "x" * 201}, "message_id", "at most 200"),
    ({"message_id": 12}, "message_id", "non-empty string"),
    ({"context": {"$message_id": ""}}, "context.$message_id", "non-empty"),
    ({"properties": {"blob": "x" * 1_100_000}}, "properties", "bytes"),
    ({"context": {"blob": "x" * 1_100_000}}, "context", "bytes"),
    ({"external_user_id": "u" * 1001}, "external_user_id", "at most 1000"),
]

INVALID_IDENTIFIES: list[tuple[dict[str, Any], str, str]] = [
    ({"external_user_id": ""}, "external_user_id", "non-empty string"),
    ({"external_user_id": "\ud800"}, "external_user_id", "lone surrogates"),
    ({"traits": ["plan"]}, "traits", "mapping"),
    ({"traits": {"big": "x" * 60_000}}, "traits", "50000 bytes"),
    ({"preferred_channel": "fax"}, "preferred_channel", "email, sms, push"),
    ({"channels": "email"}, "channels", "list"),
    ({"channels": [{"channel": "fax", "address": "x"}]}, "channels[0].channel", "email, sms"),
    ({"channels": [{"channel": "email"}]}, "channels[0].address", "non-empty string"),
    (
        {"channels": [{"channel": "email", "address": "a@b.c", "opted_in": "yes"}]},
        "channels[0].opted_in",
        "bool",
    ),
    ({"channels": [{"channel": "sms", "address": "+1", "kind": "x"}]}, "channels[0]", "unknown"),
    ({"channels": [{"channel": "sms", "address": f"+{i}"} for i in range(11)]}, "channels", "10"),
    ({"email": ""}, "channels[0].address", "non-empty string"),
    ({"email": "ada_\udfff@example.com"}, "channels[0].address", "lone surrogates"),
    ({"traits": Unreadable()}, "traits", "could not be read"),
    ({"channels": [Unreadable()]}, "channels[0]", "could not be read"),
    ({"preferred_channel": ["email"]}, "preferred_channel", "email, sms, push"),
]

VALID_TRACKS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"properties": None}, {"properties": {}}),
    ({"properties": collections.OrderedDict(a=1)}, {"properties": {"a": 1}}),
    (
        {"properties": {"nested": {"l": [1, 2.5, None, True, "s"]}}},
        {"properties": {"nested": {"l": [1, 2.5, None, True, "s"]}}},
    ),
    (
        {
            "occurred_at": datetime(
                2026, 6, 14, 14, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))
            )
        },
        {"occurred_at": "2026-06-14T12:00:00.999Z"},
    ),
    ({"occurred_at": "2026-06-14T11:59:00.5+00:00"}, {"occurred_at": "2026-06-14T11:59:00.500Z"}),
    ({"occurred_at": "2026-06-14T11:59:00Z"}, {"occurred_at": "2026-06-14T11:59:00.000Z"}),
    ({"occurred_at": NOW_DT - timedelta(days=29)}, {"occurred_at": "2026-05-16T12:00:00.123Z"}),
    ({"occurred_at": NOW_DT + timedelta(minutes=4)}, {"occurred_at": "2026-06-14T12:04:00.123Z"}),
    ({"event_type": "a" * 255}, {"event_type": "a" * 255}),
    ({"event_type": Kind.PAYMENT_FAILED}, {"event_type": "payment_failed"}),
    ({}, {"occurred_at": "2026-06-14T12:00:00.123Z"}),
]


def _track(client: whisperr.AsyncClient, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "external_user_id": "user_8842",
        "event_type": "payment_failed",
        "properties": {"amount_cents": 4900},
    }
    args.update(overrides)
    return client.track(**args)


@pytest.mark.parametrize(("overrides", "field", "rule"), INVALID_TRACKS)
async def test_invalid_track_raises_and_queues_nothing(
    overrides: dict[str, Any], field: str, rule: str, settings: dict[str, Any], api: Api
) -> None:
    """An invalid track raises naming the field and rule; nothing reaches the queue or the wire."""
    async with whisperr.AsyncClient(**settings) as client:
        _track(client)
        with pytest.raises(whisperr.InvalidEventError, match=rule) as info:
            _track(client, **overrides)
        assert info.value.field == field
        assert str(info.value).startswith(f"{field}: ")
        assert API_KEY not in str(info.value)
        assert client.stats().tracked == 1
        _track(client)
    assert len(api.events) == 2


@pytest.mark.parametrize(("overrides", "field", "rule"), INVALID_IDENTIFIES)
async def test_invalid_identify_raises(
    overrides: dict[str, Any], field: str, rule: str, settings: dict[str, Any], api: Api
) -> None:
    """An invalid identify raises naming the field and the rule; nothing is sent."""
    args: dict[str, Any] = {"external_user_id": "user_8842"} | overrides
    async with whisperr.AsyncClient(**settings) as client:
        with pytest.raises(whisperr.InvalidEventError, match=rule) as info:
            client.identify(**args)
        assert info.value.field == field
    assert api.requests == []


@pytest.mark.parametrize(("overrides", "expected"), VALID_TRACKS)
async def test_valid_track_serializes(
    overrides: dict[str, Any], expected: dict[str, Any], settings: dict[str, Any], api: Api
) -> None:
    """Valid input is normalised as the wire contract wants it."""
    async with whisperr.AsyncClient(**settings) as client:
        _track(client, **overrides)
    [event] = api.events
    assert {k: event[k] for k in expected} == expected


async def test_invalid_event_is_an_value_error(settings: dict[str, Any]) -> None:
    """InvalidEventError is a ValueError, so generic handlers catch it."""
    async with whisperr.AsyncClient(**settings) as client:
        with pytest.raises(ValueError, match="event_type"):
            client.track("u", "Bad")


async def test_non_strict_drops_counts_and_reports(settings: dict[str, Any], api: Api) -> None:
    """With strict=False an invalid event is dropped, counted, logged and reported; others go on."""
    reports: list[whisperr.DeliveryReport] = []
    async with whisperr.AsyncClient(**settings, strict=False, on_error=reports.append) as client:
        bad_id = client.track("u", "Bad Type")
        client.identify("", {"plan": "pro"})
        good_id = client.track("u", "good_type")
        await client.flush()
        stats = client.stats()
    assert [e["context"]["$message_id"] for e in api.events] == [good_id]
    assert (stats.tracked, stats.identified) == (2, 1)
    assert stats.dropped_by_reason == {"invalid": 2}
    [report] = reports
    assert (report.type, report.reason, report.count) == ("dropped", "invalid", 2)
    assert bad_id in report.message_ids
