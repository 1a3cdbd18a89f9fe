"""before_send: one place to change, enrich or drop events, before they are validated.

Through the public API, against httpx.MockTransport: what the fake API received is what counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import whisperr
from whisperr import InvalidEventError

from .conftest import NOW, Api

pytestmark = pytest.mark.anyio


def tag_region(event: dict[str, Any]) -> dict[str, Any]:
    event["properties"]["region"] = "eu"
    return event


async def test_before_send_changes_what_is_delivered(settings: dict[str, Any], api: Api) -> None:
    seen: list[dict[str, Any]] = []

    def hook(event: dict[str, Any]) -> dict[str, Any]:
        seen.append({**event, "properties": dict(event["properties"])})
        if event["event_type"] == "plan_downgraded":
            event["event_type"] = "subscription_downgraded"
        return tag_region(event)

    mine = {"plan": "pro"}
    async with whisperr.AsyncClient(**settings, before_send=hook) as client:
        first = client.track("user_1", "plan_downgraded", mine, {"locale": "de"})
        second = client.track("user_2", "payment_failed")
    assert mine == {"plan": "pro"}, "the hook changed a copy, not the caller's mapping"
    assert seen[0] == {
        "external_user_id": "user_1",
        "event_type": "plan_downgraded",
        "occurred_at": "2026-06-14T12:00:00.123Z",  # the capture time, as the wire has it
        "properties": {"plan": "pro"},
        "context": {"locale": "de", "$message_id": first},
    }
    assert seen[1]["context"] == {"$message_id": second}
    delivered = api.events
    assert [e["event_type"] for e in delivered] == ["subscription_downgraded", "payment_failed"]
    assert [e["properties"] for e in delivered] == [
        {"plan": "pro", "region": "eu"},
        {"region": "eu"},
    ]
    assert [e["context"]["$message_id"] for e in delivered] == [first, second]
    assert delivered[0]["context"]["locale"] == "de"
    assert {e["occurred_at"] for e in delivered} == {"2026-06-14T12:00:00.123Z"}


async def test_before_send_returning_none_drops_it_counted_as_filtered(
    settings: dict[str, Any], api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    reports: list[Any] = []

    def no_internal_users(event: dict[str, Any]) -> dict[str, Any] | None:
        return None if event["external_user_id"].startswith("staff_") else event

    caplog.set_level(logging.DEBUG, "whisperr")
    client = whisperr.AsyncClient(
        **settings, before_send=no_internal_users, on_error=reports.append
    )
    dropped = client.track("staff_7", "payment_failed")
    kept = client.track("user_1", "payment_failed")
    await client.aclose()
    assert [e["context"]["$message_id"] for e in api.events] == [kept]
    assert dropped
    assert dropped != kept
    stats = client.stats()
    assert stats.dropped_by_reason == {"filtered": 1}
    assert stats.tracked == 2 == stats.delivered + stats.dropped
    assert reports == [], "a drop the app asked for is not an error"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_what_before_send_returns_is_validated(settings: dict[str, Any], api: Api) -> None:
    def rename(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "event_type": "Payment Failed"}

    async with whisperr.AsyncClient(**settings, before_send=rename) as client:
        with pytest.raises(InvalidEventError) as raised:
            client.track("user_1", "payment_failed")
        assert raised.value.field == "event_type"
    assert api.events == []
    lenient = whisperr.AsyncClient(**settings, before_send=rename, strict=False)
    lenient.track("user_1", "payment_failed")
    await lenient.aclose()
    assert lenient.stats().dropped_by_reason == {"invalid": 1}
    assert api.events == []


async def test_before_send_may_build_a_new_mapping_and_a_new_message_id(
    settings: dict[str, Any], api: Api
) -> None:
    def rebuild(event: Mapping[str, Any]) -> Mapping[str, Any]:
        return {
            "external_user_id": event["external_user_id"].lower(),
            "event_type": event["event_type"],
            "occurred_at": "2026-06-14T11:59:00Z",
            "properties": {"n": 1},
            "context": {"$message_id": "outbox-17"},
        }

    async with whisperr.AsyncClient(**settings, before_send=rebuild) as client:
        returned = client.track("USER_1", "payment_failed", {"dropped": True})
    assert returned == "outbox-17"
    (event,) = api.events
    assert event["external_user_id"] == "user_1"
    assert event["occurred_at"] == "2026-06-14T11:59:00.000Z"
    assert event["properties"] == {"n": 1}
    assert event["context"]["$message_id"] == "outbox-17"


@pytest.mark.parametrize("failure", ["raises", "returns a list"])
async def test_a_failing_before_send_keeps_the_event_as_it_came_and_is_logged_once(
    settings: dict[str, Any], api: Api, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    def broken(event: dict[str, Any]) -> Any:
        event["properties"]["half_done"] = True  # changed, then it fails: none of it is kept
        if failure == "raises":
            raise KeyError("plan")
        return [event]

    caplog.set_level(logging.ERROR, "whisperr")
    async with whisperr.AsyncClient(**settings, before_send=broken) as client:
        ids = [client.track("user_1", "payment_failed", {"i": i}) for i in range(3)]
    assert [e["properties"] for e in api.events] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [e["context"]["$message_id"] for e in api.events] == ids
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "logged once, not once an event"
    assert "before_send" in errors[0].getMessage()
    assert "kept as it came" in errors[0].getMessage()
    assert bool(errors[0].exc_info) is (failure == "raises")
    assert client.stats().delivered == 3


async def test_send_runs_before_send_too(settings: dict[str, Any], api: Api) -> None:
    async with whisperr.AsyncClient(**settings, before_send=tag_region) as client:
        receipt = await client.send("user_1", "payment_failed", {"amount": 5})
    assert receipt.sent
    (request,) = [r for r in api.requests if r.url.path == "/v1/events/track"]
    assert api.bodies[0]["properties"] == {"amount": 5, "region": "eu"}
    assert request.url.path == "/v1/events/track"


async def test_a_send_dropped_by_before_send_is_not_sent(
    settings: dict[str, Any], api: Api
) -> None:
    async with whisperr.AsyncClient(**settings, before_send=lambda event: None) as client:
        receipt = await client.send("user_1", "payment_failed", message_id="m-1")
    assert (receipt.sent, receipt.message_id, receipt.attempts) == (False, "m-1", 0)
    assert api.requests == []


def test_the_sync_client_runs_before_send(settings: dict[str, Any], api: Api) -> None:
    with whisperr.Client(**settings, before_send=tag_region) as client:
        client.track("user_1", "payment_failed")
        receipt = client.send("user_2", "payment_failed")
    assert receipt.sent
    assert [b.get("properties") or b["events"][0]["properties"] for b in api.bodies] == [
        {"region": "eu"},
        {"region": "eu"},
    ]


def test_without_hooks_track_is_the_plain_method(settings: dict[str, Any]) -> None:
    """Nothing stands between track() and the queue when neither hook is set."""
    plain = whisperr.AsyncClient(**settings)
    hooked = whisperr.AsyncClient(**settings, before_send=tag_region)
    assert "track" not in vars(plain)
    assert "track" in vars(hooked)


def test_before_send_must_be_callable(settings: dict[str, Any]) -> None:
    with pytest.raises(whisperr.ConfigError, match="before_send must be a callable"):
        whisperr.AsyncClient(**settings, before_send="scrub")


def test_clock_is_the_capture_time(settings: dict[str, Any]) -> None:
    """The occurred_at the hook sees is the injected clock's, as the event is stamped."""
    seen: list[str] = []
    client = whisperr.AsyncClient(
        **settings, before_send=lambda e: seen.append(e["occurred_at"]) or e
    )
    settings["clock"].now = NOW + 1.5
    client.track("user_1", "payment_failed")
    assert seen == ["2026-06-14T12:00:01.623Z"]


# -- the PII guard, wired into the calls ---------------------------------------------------------


async def test_pii_raise_refuses_at_the_call_site_naming_the_field_not_the_value(
    settings: dict[str, Any], api: Api
) -> None:
    async with whisperr.AsyncClient(**settings, pii="raise") as client:
        with pytest.raises(InvalidEventError) as raised:
            client.track("user_1", "ticket_opened", {"ticket": {"body": "mail jane@example.com"}})
        kept = client.track("user_2", "ticket_opened", {"ticket": {"body": "the app crashes"}})
        with pytest.raises(InvalidEventError):
            await client.send("user_3", "ticket_opened", {"callback": "+44 20 7946 0958"})
    assert raised.value.field == "properties.ticket.body"
    assert "email address" in raised.value.rule
    assert "jane" not in str(raised.value)
    assert [e["context"]["$message_id"] for e in api.events] == [kept]
    assert [r.url.path for r in api.requests] == ["/v1/events/batch"]


async def test_pii_drop_fields_removes_them_and_logs_each_path_once(
    settings: dict[str, Any], api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "whisperr")
    async with whisperr.AsyncClient(**settings, pii="drop_fields") as client:
        for i in range(2):
            client.track("user_1", "ticket_opened", {"from": f"jo{i}@example.org", "n": i})
    assert [e["properties"] for e in api.events] == [{"n": 0}, {"n": 1}]
    logged = [r.getMessage() for r in caplog.records if "properties.from" in r.getMessage()]
    assert len(logged) == 1
    assert "example.org" not in logged[0]


async def test_pii_guards_traits_but_not_contact_channels(
    settings: dict[str, Any], api: Api
) -> None:
    async with whisperr.AsyncClient(**settings, pii="raise") as client:
        client.identify("user_1", {"plan": "pro"}, email="jane@example.com", phone="+14155552671")
        with pytest.raises(InvalidEventError) as raised:
            client.identify("user_1", {"contact": "jane@example.com"})
        with pytest.raises(InvalidEventError):
            await client.identify_now("user_1", {"mobile": "+1 415 555 2671"})
    assert raised.value.field == "traits.contact"
    (body,) = [
        b for r, b in zip(api.requests, api.bodies, strict=True) if r.url.path == "/v1/identify"
    ]
    assert body["traits"] == {"plan": "pro"}
    assert {c["address"] for c in body["channels"]} == {"jane@example.com", "+14155552671"}


async def test_pii_raise_with_strict_false_drops_and_counts(
    settings: dict[str, Any], api: Api
) -> None:
    client = whisperr.AsyncClient(**settings, pii="raise", strict=False)
    client.track("user_1", "ticket_opened", {"note": "call 415-555-2671"})
    await client.aclose()
    assert api.events == []
    assert client.stats().dropped_by_reason == {"invalid": 1}


async def test_pii_runs_after_before_send(settings: dict[str, Any], api: Api) -> None:
    def add_contact(event: dict[str, Any]) -> dict[str, Any]:
        event["properties"]["owner"] = "ops@example.com"
        return event

    async with whisperr.AsyncClient(
        **settings, before_send=add_contact, pii="drop_fields"
    ) as client:
        client.track("user_1", "ticket_opened", {"n": 1})
    assert [e["properties"] for e in api.events] == [{"n": 1}]


def test_pii_setting_is_checked(settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(whisperr.ConfigError, match="pii must be"):
        whisperr.AsyncClient(**settings, pii="mask")
    monkeypatch.setenv("WHISPERR_PII", "drop_fields")
    assert whisperr.Settings(api_key="k").pii == "drop_fields"


class Unreadable(Mapping[str, Any]):
    """A mapping whose reads fail (a lazy or remote mapping's might)."""

    def __getitem__(self, key: str) -> Any:
        raise ConnectionError("the backing store went away")

    def get(self, key: str, default: Any = None) -> Any:
        raise ConnectionError("the backing store went away")

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("field", ["properties", "context"])
async def test_an_unreadable_mapping_is_an_invalid_event_with_before_send_too(
    settings: dict[str, Any], api: Api, field: str
) -> None:
    async with whisperr.AsyncClient(**settings, before_send=tag_region) as client:
        with pytest.raises(InvalidEventError) as raised:
            client.track("user_1", "payment_failed", **{field: Unreadable()})
    assert raised.value.field == field
    assert api.events == []


async def test_a_hook_returning_an_unreadable_mapping_keeps_the_event_as_it_came(
    settings: dict[str, Any], api: Api
) -> None:
    async with whisperr.AsyncClient(**settings, before_send=lambda event: Unreadable()) as c:
        c.track("user_1", "payment_failed", {"n": 1})
    assert [e["properties"] for e in api.events] == [{"n": 1}]


async def test_a_send_dropped_by_before_send_is_not_counted(settings: dict[str, Any]) -> None:
    async with whisperr.AsyncClient(**settings, before_send=lambda event: None) as client:
        await client.send("user_1", "payment_failed")
    stats = client.stats()
    assert (stats.tracked, stats.sent, stats.dropped) == (0, 0, 0)
