"""AsyncClient behaviour through its public API, against an in-memory ingestion API."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import orjson
import pytest

import whisperr
from whisperr._schedule import Scheduler

from .conftest import API_KEY, Api, Clock, Sleeps

pytestmark = pytest.mark.anyio


def ids(api: Api) -> list[str]:
    return [e["context"]["$message_id"] for e in api.events]


class TestCapture:
    async def test_track_returns_the_message_id_sent(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """track() returns the $message_id that goes on the wire, a UUID string."""
        async with whisperr.AsyncClient(**settings) as client:
            message_id = client.track("u", "payment_failed")
        assert ids(api) == [message_id]
        assert len(message_id) == 36
        assert message_id[14] == "4"

    async def test_occurred_at_is_stamped_at_capture(
        self, settings: dict[str, Any], api: Api, clock: Clock
    ) -> None:
        """occurred_at is the clock at track() time, not at send time."""
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "payment_failed")
            clock.now += 3600
            await client.flush()
        assert api.events[0]["occurred_at"] == "2026-06-14T12:00:00.123Z"

    async def test_message_ids_are_distinct_random_uuids(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """Generated $message_ids are distinct version 4 UUIDs, sent as track() returned them."""
        async with whisperr.AsyncClient(**settings) as client:
            returned = [client.track("u", "a_b") for _ in range(1000)]  # several id buffers
        assert ids(api) == returned
        assert len(set(returned)) == 1000
        for value in returned:
            parsed = uuid.UUID(value)
            assert (str(parsed), parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)

    async def test_mutation_after_track_is_not_sent(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """What is sent is the event as it was when track() was called."""
        properties: dict[str, Any] = {"items": [1], "plan": "pro"}
        context: dict[str, Any] = {"ip": "10.0.0.1"}
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "plan_upgraded", properties, context)
            properties["items"].append(2)
            properties["plan"] = "free"
            context["ip"] = "changed"
        [event] = api.events
        assert event["properties"] == {"items": [1], "plan": "pro"}
        assert event["context"]["ip"] == "10.0.0.1"

    async def test_context_carries_sdk_keys_and_caller_wins(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """context has sdk_name, sdk_version and app_version; the caller's keys win."""
        async with whisperr.AsyncClient(**settings, app_version=" 2.4.1 ") as client:
            client.track("u", "a_b")
            client.track("u", "a_b", context={"sdk_name": "mine", "page": "/x"})
        first, second = api.events
        assert first["context"] == {
            "$message_id": first["context"]["$message_id"],
            "sdk_name": "whisperr-python-async",
            "sdk_version": whisperr.__version__,
            "app_version": "2.4.1",
        }
        assert second["context"]["sdk_name"] == "mine"
        assert second["context"]["page"] == "/x"
        assert second["context"]["sdk_version"] == whisperr.__version__

    async def test_caller_message_id_is_kept(self, settings: dict[str, Any], api: Api) -> None:
        """A caller's idempotency key (argument or context.$message_id) is sent unchanged."""
        async with whisperr.AsyncClient(**settings) as client:
            assert client.track("u", "a_b", message_id="outbox-1") == "outbox-1"
            assert client.track("u", "a_b", context={"$message_id": "outbox-2"}) == "outbox-2"
        assert ids(api) == ["outbox-1", "outbox-2"]

    async def test_disabled_validates_but_sends_nothing(self, api: Api) -> None:
        """disabled=True needs no key, still validates input, and sends nothing."""
        async with whisperr.AsyncClient(disabled=True, transport=api.transport()) as client:
            client.track("u", "a_b")
            with pytest.raises(whisperr.InvalidEventError):
                client.track("u", "Bad")
            assert (await client.flush()).delivered == 0
        assert api.requests == []

    async def test_track_after_close_raises(self, settings: dict[str, Any]) -> None:
        """A closed client refuses events with a clear error."""
        client = whisperr.AsyncClient(**settings)
        await client.aclose()
        with pytest.raises(whisperr.ClientClosedError, match="closed"):
            client.track("u", "a_b")
        with pytest.raises(whisperr.ClientClosedError):
            client.identify("u")


class TestBatching:
    async def test_batches_hold_at_most_max_batch_size(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """1,234 events go out as 500 + 500 + 234, in order."""
        async with whisperr.AsyncClient(**settings) as client:
            sent = [client.track("u", "a_b", {"i": i}) for i in range(1234)]
        assert [len(b["events"]) for b in api.bodies] == [500, 500, 234]
        assert ids(api) == sent

    async def test_full_batch_goes_out_without_flush(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """A full batch is sent at once, without waiting for the interval or a flush()."""
        async with whisperr.AsyncClient(**settings, max_batch_size=10) as client:
            for i in range(25):
                client.track("u", "a_b", {"i": i})
            with anyio.fail_after(5):
                while client.stats().delivered < 20:
                    await anyio.lowlevel.checkpoint()
            assert client.stats().queued == 5
            assert [len(b["events"]) for b in api.bodies] == [10, 10]

    async def test_partial_batch_goes_out_after_flush_interval(self, api: Api) -> None:
        """A lone event is sent once flush_interval has passed since it was tracked."""
        delivered = anyio.Event()

        def answer(request: httpx.Request) -> httpx.Response:
            delivered.set()
            return httpx.Response(202, json={"accepted": 1, "rejected": 0})

        api.script = [answer]
        async with whisperr.AsyncClient(
            api_key=API_KEY, transport=api.transport(), flush_interval=0.05
        ) as client:
            client.track("u", "a_b")
            with anyio.fail_after(5):
                await delivered.wait()
        assert len(api.requests) == 1

    async def test_byte_cap_splits_batches(self, settings: dict[str, Any], api: Api) -> None:
        """No request body exceeds max_batch_bytes."""
        async with whisperr.AsyncClient(**settings, max_batch_bytes=10_000) as client:
            for i in range(40):
                client.track("u", "a_b", {"blob": "x" * 1000, "i": i})
        assert all(len(r.content) <= 10_000 for r in api.requests)
        assert len(api.requests) > 1
        assert [e["properties"]["i"] for e in api.events] == list(range(40))


class TestOrdering:
    async def test_identify_is_a_barrier(self, settings: dict[str, Any], api: Api) -> None:
        """Tracks before an identify are sent before it; tracks after it are sent after it."""
        async with whisperr.AsyncClient(**settings, max_batch_size=2, max_concurrency=4) as client:
            for i in range(5):
                client.track("u", "before", {"i": i})
            client.identify("u", {"plan": "pro"})
            for i in range(5):
                client.track("u", "after", {"i": i})
        paths = [r.url.path for r in api.requests]
        position = paths.index("/v1/identify")
        assert paths.count("/v1/identify") == 1
        before = [e for b in api.bodies[:position] for e in b["events"]]
        after = [e for b in api.bodies[position + 1 :] for e in b["events"]]
        assert {e["event_type"] for e in before} == {"before"}
        assert len(before) == 5
        assert {e["event_type"] for e in after} == {"after"}
        assert len(after) == 5

    async def test_identify_waits_for_tracks_in_flight(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """The identify request starts only after every earlier track request has answered."""
        log: list[str] = []
        release = anyio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            log.append(f"start {request.url.path}")
            if request.url.path.endswith("/batch"):
                await release.wait()
            log.append(f"end {request.url.path}")
            return httpx.Response(202, json={})

        settings["transport"] = httpx.MockTransport(slow)
        async with whisperr.AsyncClient(**settings, max_batch_size=1) as client:
            client.track("u", "a_b")
            client.track("u", "a_b")
            client.identify("u")
            with anyio.fail_after(5):
                while log.count("start /v1/events/batch") < 2:
                    await anyio.lowlevel.checkpoint()
            assert "start /v1/identify" not in log
            release.set()
        assert log.index("start /v1/identify") > max(
            i for i, line in enumerate(log) if line == "end /v1/events/batch"
        )


class TestOutcomes:
    @pytest.mark.parametrize("status", [400, 404, 409, 422])
    async def test_other_4xx_drops_the_batch(
        self, status: int, settings: dict[str, Any], api: Api, reports: list[Any]
    ) -> None:
        """A 4xx other than 401/403/413/429 drops the batch and reports it, without retrying."""
        api.script = [httpx.Response(status)]
        async with whisperr.AsyncClient(**settings, on_error=reports.append) as client:
            mid = client.track("u", "a_b")
            await client.flush()
            assert client.stats().dropped_by_reason == {"rejected": 1}
        assert len(api.requests) == 1
        [report] = reports
        assert (report.type, report.reason, report.status, report.message_ids) == (
            "dropped",
            "rejected",
            status,
            (mid,),
        )

    @pytest.mark.parametrize("status", [401, 403])
    async def test_auth_failure_keeps_the_batch_at_the_front(
        self, status: int, settings: dict[str, Any], api: Api, reports: list[Any]
    ) -> None:
        """401/403 reports auth, keeps the batch, and sends it first once the key works."""
        api.script = [httpx.Response(status)]
        async with whisperr.AsyncClient(**settings, on_error=reports.append) as client:
            first = client.track("u", "a_b")
            await client.flush()
            assert client.stats().queued == 1
            second = client.track("u", "a_b")
            await client.flush()
        assert [r.type for r in reports] == ["auth"]
        assert ids(api) == [first, first, second]
        assert len(api.requests) == 3  # no retry loop on 401: the kept batch goes once per flush

    async def test_exhausted_retries_keep_the_batch(
        self, settings: dict[str, Any], api: Api, sleeps: Sleeps, reports: list[Any]
    ) -> None:
        """5xx is retried max_retries times; then the batch is kept and reported."""
        api.script = [httpx.Response(500)] * 4
        async with whisperr.AsyncClient(
            **settings, max_retries=3, on_error=reports.append
        ) as client:
            client.track("u", "a_b")
            result = await client.flush()
            assert (result.delivered, result.pending) == (0, 1)
            assert client.stats().retried == 3
            assert (await client.flush()).delivered == 1
        assert len(sleeps.delays) == 3
        assert [(r.type, r.reason) for r in reports] == [("retry_exhausted", "server_error")]

    @pytest.mark.parametrize(
        "failure",
        [
            httpx.Response(503),
            httpx.Response(429),
            httpx.ConnectError("refused"),
            httpx.ReadTimeout("slow"),
            httpx.RemoteProtocolError("closed"),
        ],
    )
    async def test_transient_failures_are_retried(
        self, failure: Any, settings: dict[str, Any], api: Api
    ) -> None:
        """429, 5xx, network errors and timeouts are retried with the same message id."""
        api.script = [failure, failure]
        async with whisperr.AsyncClient(**settings) as client:
            mid = client.track("u", "a_b")
        assert ids(api) == [mid, mid, mid]

    async def test_backoff_is_capped_exponential_with_full_jitter(
        self, settings: dict[str, Any], api: Api, sleeps: Sleeps
    ) -> None:
        """Waits lie in [0, min(cap, base * 2**n)]."""
        api.script = [httpx.Response(500)] * 6
        async with whisperr.AsyncClient(
            **settings, max_retries=6, backoff_base=1.0, backoff_cap=4.0
        ) as client:
            client.track("u", "a_b")
        bounds = [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
        assert len(sleeps.delays) == 6
        assert all(0 <= d <= b for d, b in zip(sleeps.delays, bounds, strict=True))

    async def test_partial_acceptance_is_delivered_and_reported(
        self, settings: dict[str, Any], api: Api, reports: list[Any]
    ) -> None:
        """A 2xx with rejected > 0 is not resent; the rejected count is reported as dropped."""
        api.script = [httpx.Response(202, json={"accepted": 2, "rejected": 1})]
        async with whisperr.AsyncClient(**settings, on_error=reports.append) as client:
            for _ in range(3):
                client.track("u", "a_b")
        assert len(api.requests) == 1
        assert client.stats().delivered == 2
        assert client.stats().dropped_by_reason == {"partially_rejected": 1}
        assert [(r.type, r.count) for r in reports] == [("dropped", 1)]

    async def test_413_splits_the_batch(self, settings: dict[str, Any], api: Api) -> None:
        """A 413 batch is halved and resent; a single event answered 413 is dropped alone."""

        def limited(request: httpx.Request) -> httpx.Response:
            events = orjson.loads(request.content)["events"]
            if len(events) > 2 or any(e["properties"].get("huge") for e in events):
                return httpx.Response(413)
            return httpx.Response(202, json={"accepted": len(events), "rejected": 0})

        settings["transport"] = httpx.MockTransport(limited)
        async with whisperr.AsyncClient(**settings) as client:
            for i in range(7):
                client.track("u", "a_b", {"i": i, "huge": i == 3})
        stats = client.stats()
        assert (stats.delivered, stats.dropped_by_reason) == (6, {"payload_too_large": 1})

    async def test_redirects_are_not_followed(self, settings: dict[str, Any], api: Api) -> None:
        """A 3xx is never followed with the key; the batch is dropped and reported."""
        api.script = [httpx.Response(307, headers={"Location": "https://elsewhere.example/"})]
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "a_b")
        assert len(api.requests) == 1
        assert client.stats().dropped_by_reason == {"redirected": 1}

    async def test_expired_events_are_dropped_before_sending(
        self, settings: dict[str, Any], api: Api, clock: Clock
    ) -> None:
        """An event older than the server's 30-day window by send time is dropped, not sent."""
        async with whisperr.AsyncClient(**settings) as client:
            old = client.track("u", "a_b")
            clock.now += 31 * 86400
            new = client.track("u", "a_b")
        assert ids(api) == [new]
        assert client.stats().dropped_by_reason == {"expired": 1}
        assert old not in ids(api)


class TestRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("7", 7.0),
            (" 0 ", 0.0),
            ("3600", 60.0),
            ("+5s", None),
            ("", None),
            ("soon", None),
            ("-5", None),
            ("1.5", None),
        ],
    )
    @pytest.mark.parametrize("status", [429, 503])
    async def test_retry_after_vectors(
        self,
        value: str,
        expected: float | None,
        status: int,
        settings: dict[str, Any],
        api: Api,
        sleeps: Sleeps,
    ) -> None:
        """Retry-After on 429/503 sets the wait (capped at 60 s); unusable values use backoff."""
        api.script = [httpx.Response(status, headers={"Retry-After": value})]
        tiny = 1e-6  # the computed backoff lies in (0, tiny]; a Retry-After value never does
        async with whisperr.AsyncClient(**settings, backoff_base=tiny, backoff_cap=tiny) as c:
            c.track("u", "a_b")
        [delay] = sleeps.delays
        if expected is None:
            assert 0 < delay <= tiny
        else:
            assert delay == expected

    @pytest.mark.parametrize(("offset", "expected"), [(5, 5.0), (-30, 0.0), (7200, 60.0)])
    async def test_retry_after_http_date(
        self,
        offset: int,
        expected: float,
        settings: dict[str, Any],
        api: Api,
        sleeps: Sleeps,
        clock: Clock,
    ) -> None:
        """An HTTP-date is read relative to the clock: ahead waits, past means now."""
        when = datetime.fromtimestamp(clock.now + offset, timezone.utc)
        api.script = [
            httpx.Response(429, headers={"Retry-After": format_datetime(when, usegmt=True)})
        ]
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "a_b")
        assert sleeps.delays == [pytest.approx(expected, abs=1.0)]

    async def test_retry_after_is_ignored_on_other_statuses(
        self, settings: dict[str, Any], api: Api, sleeps: Sleeps
    ) -> None:
        """A 500 with Retry-After uses the computed backoff."""
        api.script = [httpx.Response(500, headers={"Retry-After": "50"})]
        async with whisperr.AsyncClient(**settings, backoff_base=0.01, backoff_cap=0.01) as c:
            c.track("u", "a_b")
        assert sleeps.delays[0] <= 0.01


class TestFlushAndClose:
    async def test_flush_settles_everything_tracked_before_it(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """After flush() every earlier event is delivered; the result counts them."""
        async with whisperr.AsyncClient(**settings) as client:
            for _ in range(1001):
                client.track("u", "a_b")
            result = await client.flush()
            assert result == whisperr.FlushResult(
                delivered=1001, dropped=0, pending=0, timed_out=False
            )
            assert len(api.events) == 1001

    async def test_flush_timeout_returns_with_pending(self, settings: dict[str, Any]) -> None:
        """flush(timeout) returns when the deadline passes, reporting what is still pending."""
        never = anyio.Event()

        async def hang(request: httpx.Request) -> httpx.Response:
            await never.wait()
            raise AssertionError("unreachable")

        settings["transport"] = httpx.MockTransport(hang)
        client = whisperr.AsyncClient(**settings)
        client.track("u", "a_b")
        result = await client.flush(timeout=0.05)
        assert (result.timed_out, result.pending, result.delivered) == (True, 1, 0)
        closed = await client.aclose(timeout=0.05)
        assert closed.timed_out
        stats = client.stats()
        assert (stats.tracked, stats.delivered, stats.dropped) == (1, 0, 1)
        assert stats.dropped_by_reason == {"shutdown": 1}

    async def test_aclose_accounts_for_every_event(
        self, settings: dict[str, Any], api: Api, reports: list[Any]
    ) -> None:
        """After aclose, tracked == delivered + dropped and each undelivered event is reported."""
        api.script = [httpx.Response(401)] * 10
        api.default = 401
        client = whisperr.AsyncClient(**settings, on_error=reports.append)
        mids = [client.track("u", "a_b") for _ in range(3)]
        await client.aclose(timeout=5)
        stats = client.stats()
        assert stats.tracked == stats.delivered + stats.dropped == 3
        assert stats.dropped_by_reason == {"unauthorized": 3}
        dropped = [r for r in reports if r.type == "dropped"]
        assert sorted(m for r in dropped for m in r.message_ids) == sorted(mids)

    async def test_aclose_is_idempotent_and_closes_owned_pool_only(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """An injected httpx client stays open; closing twice is harmless."""
        http = httpx.AsyncClient(transport=api.transport())
        settings.pop("transport")
        client = whisperr.AsyncClient(**settings, http_client=http)
        client.track("u", "a_b")
        await client.aclose()
        assert (await client.aclose()).delivered == 0
        assert not http.is_closed
        await http.aclose()

    async def test_works_without_async_with(self, settings: dict[str, Any], api: Api) -> None:
        """The runner starts on first use inside a loop; aclose() ends it."""
        client = whisperr.AsyncClient(**settings)
        client.track("u", "a_b")
        await client.aclose()
        assert len(api.events) == 1

    async def test_overflow_drops_oldest_by_default(
        self, settings: dict[str, Any], api: Api, reports: list[Any]
    ) -> None:
        """A full queue drops its oldest event, counted and reported as queue_overflow."""
        client = whisperr.AsyncClient(**settings, max_queue_size=3, on_error=reports.append)
        mids = [client.track("u", "a_b") for _ in range(5)]
        await client.aclose()
        assert ids(api) == mids[2:]
        assert client.stats().dropped_by_reason == {"queue_overflow": 2}
        assert reports[0].message_ids == tuple(mids[:2])

    async def test_overflow_drop_newest(self, settings: dict[str, Any], api: Api) -> None:
        """overflow='drop_newest' keeps the queue and refuses the new event."""
        client = whisperr.AsyncClient(**settings, max_queue_size=3, overflow="drop_newest")
        mids = [client.track("u", "a_b") for _ in range(5)]
        await client.aclose()
        assert ids(api) == mids[:3]
        stats = client.stats()
        assert (stats.tracked, stats.delivered, stats.dropped) == (5, 3, 2)


class TestHooks:
    async def test_raising_hook_does_not_disturb_delivery(
        self, settings: dict[str, Any], api: Api, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hook that raises is logged; delivery of other batches goes on."""

        def hook(report: whisperr.DeliveryReport) -> None:
            raise RuntimeError("boom")

        api.script = [httpx.Response(400)]
        async with whisperr.AsyncClient(**settings, on_error=hook, max_batch_size=1) as client:
            client.track("u", "a_b")
            client.track("u", "a_b")
        assert client.stats().delivered == 1
        assert "on_error hook raised" in caplog.text

    async def test_async_hook_is_awaited(self, settings: dict[str, Any], api: Api) -> None:
        """An async on_error hook receives the report."""
        got: list[whisperr.DeliveryReport] = []

        async def hook(report: whisperr.DeliveryReport) -> None:
            await anyio.lowlevel.checkpoint()
            got.append(report)

        api.script = [httpx.Response(400)]
        async with whisperr.AsyncClient(**settings, on_error=hook) as client:
            client.track("u", "a_b")
            await client.flush()
        assert [r.reason for r in got] == ["rejected"]


def _reprs_within(obj: object, depth: int) -> str:
    """The reprs of an object's attributes, and of theirs, ``depth`` levels down."""
    if depth == 0 or not hasattr(obj, "__dict__"):
        return ""
    parts = vars(obj).values()
    return "".join(repr(part) + _reprs_within(part, depth - 1) for part in parts)


class TestSecurity:
    async def test_key_never_in_logs_reprs_or_reports(
        self,
        settings: dict[str, Any],
        api: Api,
        caplog: pytest.LogCaptureFixture,
        reports: list[Any],
    ) -> None:
        """The API key appears in no log line, repr or report, whatever happens."""
        caplog.set_level(logging.DEBUG)
        api.script = [httpx.Response(500), httpx.Response(401), httpx.ConnectError("x")]
        client = whisperr.AsyncClient(**settings, on_error=reports.append, max_retries=1)
        client.track("u", "a_b")
        await client.flush()
        await client.flush()
        await client.aclose()
        seen = caplog.text + repr(client) + repr(client.settings) + repr(reports)
        seen += repr(client.stats()) + repr(vars(client))
        # and the parts behind it, down to the delivery that holds the headers
        seen += _reprs_within(client, depth=3)
        assert "<request headers: " in seen  # the walk reached them
        assert API_KEY not in seen
        assert "wrk_" not in seen

    async def test_headers(self, settings: dict[str, Any], api: Api) -> None:
        """Requests carry X-API-Key, JSON content type and a User-Agent naming this SDK."""
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "a_b")
        headers = api.requests[0].headers
        assert headers["x-api-key"] == API_KEY
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"] == f"whisperr-python-async/{whisperr.__version__}"
        assert "authorization" not in headers


async def test_one_pooled_connection_for_many_batches(settings: dict[str, Any], api: Api) -> None:
    """Every batch goes through the same httpx client (one pool for the client's life)."""
    seen: set[int] = set()
    original = httpx.AsyncClient.send

    async def spy(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Response:
        seen.add(id(self))
        return await original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx.AsyncClient, "send", spy)
        async with whisperr.AsyncClient(**settings, max_batch_size=10) as client:
            for _ in range(100):
                client.track("u", "a_b")
    assert len(api.requests) == 10
    assert len(seen) == 1


def test_final_delivery_when_the_loop_ends_without_aclose(
    settings: dict[str, Any], api: Api
) -> None:
    """asyncio.run() returning without aclose() still delivers what was queued: the client's
    own thread takes over, and a later loop's flush() waits for it."""
    client = whisperr.AsyncClient(**settings)

    async def main() -> None:
        for _ in range(700):
            client.track("u", "a_b")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert "own thread" in repr(client) or client.stats().delivered == 700
    assert not asyncio.run(client.flush(timeout=5)).timed_out
    assert len(api.events) == 700
    assert client.stats().delivered == 700


@pytest.mark.parametrize("turns", range(5))
def test_a_loop_that_ends_just_after_a_batch_was_taken_warns_nothing(
    settings: dict[str, Any], api: Api, turns: int
) -> None:
    """The loop may end in the turn after the runner started a delivery's task, before that
    task's first step: the unstarted coroutine is closed, not left to warn "never awaited"
    at exit, and its batch is delivered by the own thread like the rest."""
    client = whisperr.AsyncClient(**settings)

    async def main() -> None:
        for _ in range(1_400):  # batches taken over several steps: one of them ends the loop
            client.track("u", "a_b")
        for _ in range(turns):
            await asyncio.sleep(0)

    def run() -> None:
        asyncio.run(main())
        assert not asyncio.run(client.flush(timeout=5)).timed_out

    assert never_awaited(run) == []
    assert len({e["context"]["$message_id"] for e in api.events}) == 1_400


def never_awaited(run: Callable[[], object]) -> list[str]:
    """The "never awaited" warnings that ``run()`` and a collection after it raise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
        gc.collect()
    return [str(w.message) for w in caught if "never awaited" in str(w.message)]


@pytest.mark.parametrize("turns", range(4))
def test_a_loop_that_ends_before_an_async_hook_or_a_send_began_warns_nothing(
    settings: dict[str, Any], turns: int
) -> None:
    """An async on_error hook and a send started as tasks in the loop's last turns: closed,
    not left to warn, and the send counted as failed (cut off), not left under way."""

    async def hook(report: whisperr.DeliveryReport) -> None:
        pass

    client = whisperr.AsyncClient(**settings, max_queue_size=5, on_error=hook)

    async def main() -> None:
        for _ in range(20):  # 15 dropped at capture: a report for the hook
            client.track("u", "a_b")
        asyncio.get_running_loop().create_task(client.send("u", "a_b"))
        for _ in range(turns):
            await asyncio.sleep(0)

    assert never_awaited(lambda: asyncio.run(main())) == []
    assert never_awaited(lambda: asyncio.run(client.aclose(timeout=5))) == []
    stats = client.stats()
    assert stats.sending == 0  # before, a send whose task never began stayed under way
    assert stats.sent + stats.send_failed == 1  # sent, or counted as cut off


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_backend(settings: dict[str, Any], api: Api, sleeps: Sleeps) -> None:
    """track, flush, a retry and aclose work under trio through anyio."""
    api.script = [httpx.Response(503)]
    async with whisperr.AsyncClient(**settings) as client:
        mids = [client.track("u", "a_b") for _ in range(3)]
        assert (await client.flush()).delivered == 3
        client.identify("u", {"plan": "pro"})
    assert ids(api) == mids + mids
    assert len(sleeps.delays) == 1
    assert api.requests[-1].url.path == "/v1/identify"


def test_events_tracked_outside_any_loop_are_delivered_by_aclose(
    settings: dict[str, Any], api: Api
) -> None:
    """Events tracked before any event loop runs are delivered when aclose() runs in one."""
    client = whisperr.AsyncClient(**settings)
    mid = client.track("u", "a_b")
    asyncio.run(client.aclose())
    assert ids(api) == [mid]


async def test_aclose_again_after_a_cancelled_aclose_finishes_the_job(
    settings: dict[str, Any], api: Api
) -> None:
    """If the caller of aclose() is cancelled, a second aclose() still delivers and accounts."""
    gate = anyio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return httpx.Response(202, json={})

    settings["transport"] = httpx.MockTransport(slow)
    client = whisperr.AsyncClient(**settings)
    client.track("u", "a_b")
    with anyio.move_on_after(0.01):
        await client.aclose()
    gate.set()
    result = await client.aclose(timeout=5)
    stats = client.stats()
    assert (stats.tracked, stats.delivered, stats.dropped, result.pending) == (1, 1, 0, 0)


async def test_flush_during_an_auth_pause_attempts_new_events_too(
    settings: dict[str, Any], api: Api
) -> None:
    """While a kept batch is paused, flush() still gives newer events their attempt at once."""
    api.script = [httpx.Response(401), httpx.Response(401), httpx.Response(401)]
    async with whisperr.AsyncClient(**settings, backoff_base=10.0) as client:  # pause >= 10 s
        client.track("u", "a_b")
        await client.flush()
        client.track("u", "a_b")
        with anyio.fail_after(5):
            result = await client.flush()
        assert (result.pending, result.timed_out) == (2, False)
        assert len(api.requests) == 3


async def test_async_hook_receives_the_reports_made_at_close(
    settings: dict[str, Any], api: Api
) -> None:
    """An async on_error hook is awaited for the drops that closing reports."""
    got: list[whisperr.DeliveryReport] = []

    async def hook(report: whisperr.DeliveryReport) -> None:
        await anyio.lowlevel.checkpoint()
        got.append(report)

    api.default = 401
    client = whisperr.AsyncClient(**settings, on_error=hook)
    mid = client.track("u", "a_b")
    await client.aclose(timeout=5)
    assert [(r.type, r.reason) for r in got] == [
        ("auth", "unauthorized"),
        ("dropped", "unauthorized"),
    ]
    assert got[-1].message_ids == (mid,)


async def test_an_undecodable_2xx_body_is_retried_not_fatal(
    settings: dict[str, Any], api: Api
) -> None:
    """An answer whose body cannot be decoded is a failed attempt: retried; the runner survives."""
    api.script = [httpx.DecodingError("Error -3 while decompressing data")]
    client = whisperr.AsyncClient(**settings)
    mid = client.track("u", "a_b")
    with anyio.fail_after(5):
        result = await client.aclose()
    assert ids(api) == [mid, mid]
    assert (result.delivered, result.timed_out) == (1, False)


async def test_the_runner_does_not_spin_while_a_batch_is_in_flight(
    settings: dict[str, Any],
) -> None:
    """With the only slot busy and the interval passed, the runner waits instead of spinning."""
    release = anyio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(202, json={})

    settings["transport"] = httpx.MockTransport(slow)
    passes = 0
    original = Scheduler.ready_batch

    def counting(self: Scheduler, now: float, closing: bool = False) -> Any:
        nonlocal passes
        passes += 1
        return original(self, now, closing)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "ready_batch", counting)
        client = whisperr.AsyncClient(
            **settings | {"flush_interval": 0.001}, max_batch_size=2, max_concurrency=1
        )
        client.track("u", "a_b")
        for _ in range(3):
            await anyio.lowlevel.checkpoint()  # the runner starts the interval for it
        client.track("u", "a_b")  # two go out as a full batch and hang in the only slot;
        client.track("u", "a_b")  # this one is due 1 ms later and must wait for that slot
        with anyio.move_on_after(0.2):
            await anyio.Event().wait()
        busy_passes = passes
        release.set()
        await client.aclose(timeout=5)
    assert busy_passes < 20


def test_a_batch_cut_off_by_a_closed_loop_is_sent_again(settings: dict[str, Any], api: Api) -> None:
    """A batch in flight when its loop is closed (not cancelled) is kept and delivered later."""
    calls = 0

    async def first_hangs(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(3600)
        return httpx.Response(202, json={})

    settings["transport"] = httpx.MockTransport(first_hangs)
    client = whisperr.AsyncClient(**settings | {"flush_interval": 0.001})

    async def track_then_leave() -> None:
        client.track("u", "a_b")
        await asyncio.sleep(0.05)  # the request is now hanging

    loop = asyncio.new_event_loop()
    loop.run_until_complete(track_then_leave())
    loop.close()

    result = asyncio.run(client.aclose(timeout=5))
    stats = client.stats()
    assert calls == 2
    assert (stats.tracked, stats.delivered, stats.dropped, result.timed_out) == (1, 1, 0, False)
