"""Fault injection over real sockets: the public AsyncClient against a misbehaving LocalServer.

Every test drives `whisperr.AsyncClient` against the bundled server on 127.0.0.1 with one kind of
fault switched on, and checks the same things: each event the client accepted is stored by the
server exactly once or accounted for as dropped, the delivery reports and `stats()` say what
happened, and the run ends by itself within a deadline. Backoff is kept tiny (or the sleep is
injected), so no test waits on the wall clock to pass.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import anyio
import pytest

import whisperr
from whisperr import DeliveryReport
from whisperr.server import Fault, LocalServer, create_app

from .conftest import API_KEY, Sleeps

pytestmark = pytest.mark.anyio

BATCH = "/v1/events/batch"
IDENTIFY = "/v1/identify"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


def make_client(
    server_url: str, reports: list[DeliveryReport], **overrides: Any
) -> whisperr.AsyncClient:
    """A client for the local server with tiny backoff; batches go out on flush/close/size."""
    options: dict[str, Any] = {
        "api_key": API_KEY,
        "base_url": server_url,
        "on_error": reports.append,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "flush_interval": 60.0,
    }
    options.update(overrides)
    return whisperr.AsyncClient(**options)


def track_many(
    client: whisperr.AsyncClient, n: int, event_type: str = "payment_failed"
) -> list[str]:
    return [client.track(f"user_{i % 17}", event_type, {"i": i}) for i in range(n)]


def stored_ids(server: LocalServer) -> list[str]:
    return [e["context"]["$message_id"] for e in server.app.events]


def assert_stored_exactly_once(server: LocalServer, expected: list[str] | set[str]) -> None:
    stored = stored_ids(server)
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == set(expected)


def assert_accounted(client: whisperr.AsyncClient, taken: int) -> whisperr.Stats:
    """After aclose(): every track and identify taken is either delivered or dropped, nothing
    is left."""
    stats = client.stats()
    assert stats.tracked + stats.identified == taken
    assert stats.tracked + stats.identified == stats.delivered + stats.dropped
    assert stats.dropped == sum(stats.dropped_by_reason.values())
    assert (stats.queued, stats.in_flight, stats.queued_bytes) == (0, 0, 0)
    return stats


def batch_statuses(server: LocalServer) -> list[int | None]:
    return [r.status for r in server.app.requests if r.path == BATCH]


def dropped_ids(reports: list[DeliveryReport]) -> list[str]:
    return [mid for r in reports if r.type == "dropped" for mid in r.message_ids]


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the SDK offers no event for; the caller's deadline bounds the wait."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.005)


class GatedSleep:
    """A sleep that records its delay, then waits until the test opens the gate."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate = anyio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self.gate.wait()


class InFlightSleep:
    """An instant sleep that records how many events the client had in flight at each backoff."""

    def __init__(self) -> None:
        self.client: whisperr.AsyncClient | None = None
        self.in_flight: list[int] = []

    async def __call__(self, delay: float) -> None:
        assert self.client is not None
        self.in_flight.append(self.client.stats().in_flight)
        await anyio.lowlevel.checkpoint()


# -- 1. one fault at a time ------------------------------------------------------------------


async def test_5xx_then_recovery(server: LocalServer, reports: list[DeliveryReport]) -> None:
    """500 and 503 answers are retried with backoff until the server recovers; nothing is lost."""
    server.app.faults.script([Fault.status(500), Fault.status(503), Fault.status(500)])
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        sent = track_many(client, 10)
        result = await client.aclose(timeout=5)
    assert_stored_exactly_once(server, sent)
    assert batch_statuses(server) == [500, 503, 500, 202]
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.dropped, stats.retried) == (10, 0, 30)
    assert (result.delivered, result.dropped, result.pending, result.timed_out) == (10, 0, 0, False)
    assert reports == []  # retried failures are not reported, but the last one is visible
    assert stats.last_error is not None
    assert (stats.last_error.type, stats.last_error.status) == ("retrying", 500)


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "1", 1.0), (429, "http-date+5", 5.0), (503, "2", 2.0)],
    ids=["429-seconds", "429-http-date", "503-seconds"],
)
async def test_retry_after_is_honoured(
    server: LocalServer,
    reports: list[DeliveryReport],
    sleeps: Sleeps,
    status: int,
    retry_after: str,
    expected: float,
) -> None:
    """A 429/503 with Retry-After (seconds or HTTP-date) makes the client wait exactly that long."""
    now = float(int(time.time()))  # a whole second, so an HTTP-date is exact
    if retry_after == "http-date+5":
        retry_after = format_datetime(datetime.fromtimestamp(now + 5, timezone.utc), usegmt=True)
    server.app.faults.script([Fault.status(status, retry_after=retry_after)])
    with anyio.fail_after(10):
        client = make_client(server.url, reports, sleep=sleeps, clock=lambda: now)
        sent = track_many(client, 5)
        await client.aclose(timeout=5)
    assert sleeps.delays == [expected]
    assert_stored_exactly_once(server, sent)
    assert batch_statuses(server) == [status, 202]
    stats = assert_accounted(client, 5)
    assert (stats.delivered, stats.retried) == (5, 5)
    assert reports == []


async def test_closed_connection_is_retried(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A connection closed without an answer is a network error: retried, then delivered."""
    server.app.faults.script([Fault.close(), Fault.close()])
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        sent = track_many(client, 10)
        await client.aclose(timeout=5)
    assert_stored_exactly_once(server, sent)
    assert batch_statuses(server) == [None, None, 202]
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.retried) == (10, 20)
    assert reports == []


async def test_lost_ack_is_stored_exactly_once(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A batch stored but not acknowledged is resent with the same ids and stored once."""
    server.app.faults.script([Fault.lost_ack()])
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        sent = track_many(client, 25)
        await client.aclose(timeout=5)
    requests = [r for r in server.app.requests if r.path == BATCH]
    assert [(r.status, r.events) for r in requests] == [(None, 25), (202, 25)]
    assert requests[0].fault == Fault.lost_ack()
    assert len(server.app.events) == 25
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 25)
    assert (stats.delivered, stats.retried) == (25, 25)
    assert reports == []


async def test_delay_beyond_request_timeout_is_retried(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """An answer slower than request_timeout is a timeout and retried; a short delay is fine."""
    server.app.faults.script([Fault.delay(0.6), Fault.delay(0.05)])
    with anyio.fail_after(10):
        client = make_client(server.url, reports, request_timeout=0.3)
        sent = track_many(client, 10)
        await client.aclose(timeout=5)
    # The slow request may be stored late (the server does not notice the client left): the
    # retry carries the same ids, so either way each event is stored once.
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.retried) == (10, 10)
    assert reports == []


async def test_auth_failure_pauses_then_resumes(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """401s report "auth" and keep the batch (no retry loop); once the key works it is delivered."""
    server.app.faults.auth_fail_for(3)
    with anyio.fail_after(15):
        client = make_client(server.url, reports)
        sent = track_many(client, 10)
        results = []
        for _ in range(10):  # each flush gives the kept batch one more attempt
            result = await client.flush(timeout=3)
            results.append(result)
            if result.pending == 0:
                break
        # Three flushes end with the batch kept, the fourth delivers it (a kept batch may also
        # be retried by itself after its pause, which would only make this shorter).
        assert 1 < len(results) <= 4
        assert [(r.delivered, r.pending) for r in results[:-1]] == [(0, 10)] * (len(results) - 1)
        assert (results[-1].delivered, results[-1].pending) == (10, 0)
        assert not any(r.timed_out for r in results)
        await client.aclose(timeout=5)
    assert batch_statuses(server) == [401, 401, 401, 202]
    assert [(r.type, r.reason, r.status, r.count) for r in reports] == [
        ("auth", "unauthorized", 401, 10)
    ] * 3
    assert all(r.message_ids == tuple(sent) for r in reports)
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.dropped, stats.retried) == (10, 0, 0)


async def test_flush_settles_when_events_wait_behind_a_batch_kept_after_401(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """With a rejected key, a flush() after more tracks returns once every batch got an attempt."""
    server.app.faults.auth_fail_for(1_000)  # the key stays wrong for this whole test
    with anyio.fail_after(10):
        client = make_client(server.url, reports, shutdown_timeout=1)
        client.track("u", "a_b")
        kept = await client.flush(timeout=1)
        second = client.track("u", "a_b")
        again = await client.flush(timeout=1)
        await client.aclose(timeout=1)
    assert (kept.pending, kept.timed_out) == (1, False)
    assert [r.type for r in reports[:1]] == ["auth"]
    # Documented: settled includes "kept after an auth failure"; each kept batch gets one
    # more attempt per flush. The new event should have been tried (and kept) too.
    assert (again.pending, again.timed_out) == (2, False)
    assert second in {mid for r in reports if r.type == "auth" for mid in r.message_ids}
    assert client.stats().dropped_by_reason == {"unauthorized": 2}


async def test_flush_settles_when_tracks_wait_behind_an_identify_kept_after_401(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """With a rejected key, flush() returns once a kept identify got its attempt; close is quick."""
    server.app.faults.auth_fail_for(1_000)  # the key stays wrong for this whole test
    with anyio.fail_after(10):
        client = make_client(server.url, reports, shutdown_timeout=1)
        client.identify("user_1", {"plan": "pro"})
        kept = await client.flush(timeout=1)
        client.track("user_1", "plan_upgraded")  # must wait for the identify (barrier)
        again = await client.flush(timeout=1)
        started = time.monotonic()
        closed = await client.aclose(timeout=1)
        elapsed = time.monotonic() - started
    assert (kept.pending, kept.timed_out) == (1, False)
    assert_accounted(client, 2)
    assert server.app.events == []
    # Documented: settled includes "kept after an auth failure"; the track cannot move before
    # the identify, so it is pending, and the flush is done.
    assert (again.pending, again.timed_out) == (2, False)
    assert not closed.timed_out
    assert elapsed < 0.9  # returns before its timeout of 1 s: nothing was left to wait for


async def test_payload_too_large_splits_and_drops_the_oversized_event(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """413 splits a batch until it fits; an event too large alone is dropped, the rest delivered."""
    limit = 2500
    server.app.faults.max_body_bytes = limit
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        small = [client.track("u", "note_added", {"pad": "x" * 150, "i": i}) for i in range(12)]
        big = client.track("u", "note_added", {"pad": "y" * 4000})
        small += [client.track("u", "note_added", {"pad": "x" * 150, "i": i}) for i in range(12)]
        result = await client.aclose(timeout=5)
    assert_stored_exactly_once(server, small)
    requests = [r for r in server.app.requests if r.path == BATCH]
    assert (requests[0].status, requests[0].events) == (413, 25)  # one batch at first
    assert all(r.body_bytes <= limit for r in requests if r.status == 202)
    assert sum(r.events for r in requests if r.status == 202) == 24
    assert {r.status for r in requests} == {202, 413}
    [report] = reports
    assert (report.type, report.reason, report.status, report.count) == (
        "dropped",
        "payload_too_large",
        413,
        1,
    )
    assert report.message_ids == (big,)
    stats = assert_accounted(client, 25)
    assert (stats.delivered, stats.dropped) == (24, 1)
    assert stats.dropped_by_reason == {"payload_too_large": 1}
    assert (result.delivered, result.dropped) == (24, 1)


async def test_poison_event_drops_only_its_batch(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A 400 for a poison event drops its batch as "rejected" with its ids; others are delivered."""
    server.app.faults.poison = "poison_pilled"
    with anyio.fail_after(10):
        client = make_client(server.url, reports, max_batch_size=5)
        first = track_many(client, 5)
        doomed = [*track_many(client, 2), client.track("u", "poison_pilled")]
        doomed += track_many(client, 2)
        last = track_many(client, 5)
        await client.aclose(timeout=5)
    assert_stored_exactly_once(server, first + last)
    assert sorted(batch_statuses(server), key=str) == [202, 202, 400]  # never resent
    [report] = reports
    assert (report.type, report.reason, report.status, report.count) == (
        "dropped",
        "rejected",
        400,
        5,
    )
    assert report.message_ids == tuple(doomed)
    stats = assert_accounted(client, 15)
    assert (stats.delivered, stats.dropped, stats.retried) == (10, 5, 0)
    assert stats.dropped_by_reason == {"rejected": 5}


async def test_partially_rejected_batch_is_reported_not_resent(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A 202 with rejected > 0 counts those events dropped ("partially_rejected"), not resent."""
    server.app.faults.reject = lambda event: bool(event["properties"].get("bad"))
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        good = [client.track("u", "a_b", {"i": i}) for i in range(8)]
        bad = [client.track("u", "a_b", {"bad": True, "i": i}) for i in range(2)]
        await client.aclose(timeout=5)
    assert_stored_exactly_once(server, good)
    assert not set(bad) & set(stored_ids(server))
    assert batch_statuses(server) == [202]
    [report] = reports
    assert (report.type, report.reason, report.status, report.count) == (
        "dropped",
        "partially_rejected",
        202,
        2,
    )
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.dropped, stats.retried) == (8, 2, 0)
    assert stats.dropped_by_reason == {"partially_rejected": 2}


# -- 2. the headline: everything at once ----------------------------------------------------


async def test_20k_events_through_a_fault_mix_are_stored_exactly_once(
    server: LocalServer, reports: list[DeliveryReport], sleeps: Sleeps
) -> None:
    """20,000 events through 503/429/close/lost-ack faults are all stored once, none dropped."""
    server.app.faults.mix(
        {
            Fault.status(503): 0.2,
            Fault.status(429, retry_after="1"): 0.1,
            Fault.close(): 0.1,
            Fault.lost_ack(): 0.1,
        },
        seed=20_000,
    )
    with anyio.fail_after(60):
        client = make_client(server.url, reports, sleep=sleeps, max_retries=20)
        sent = []
        for i in range(20_000):
            sent.append(client.track(f"user_{i % 997}", "payment_failed", {"i": i}))
            if i % 1000 == 0:
                await anyio.lowlevel.checkpoint()  # full batches go out while tracking
        early = client.stats().delivered
        result = await client.aclose(timeout=50)
    assert len(set(sent)) == 20_000
    assert_stored_exactly_once(server, sent)
    assert len(server.app.events) == 20_000
    stats = assert_accounted(client, 20_000)
    assert (stats.delivered, stats.dropped) == (20_000, 0)
    assert (result.delivered, result.dropped, result.pending, result.timed_out) == (
        20_000 - early,
        0,
        0,
        False,
    )
    assert reports == []
    statuses = batch_statuses(server)
    faults = [r.fault for r in server.app.requests if r.fault is not None]
    assert {503, 429, None} <= set(statuses)
    assert {Fault.lost_ack(), Fault.close()} <= set(faults)
    assert stats.retried >= len(faults)  # every fault cost at least one event a retry
    assert 1.0 in sleeps.delays  # Retry-After: 1 was honoured (without waiting a real second)


# -- 3 to 5. deadlines: unreachable, hanging, long Retry-After --------------------------------


async def test_unreachable_server_close_is_bounded_and_accounted(
    reports: list[DeliveryReport],
) -> None:
    """With nothing listening, aclose(timeout=2) returns in time and drops all as network_error."""
    url = f"http://127.0.0.1:{free_port()}"
    with anyio.fail_after(10):
        client = make_client(url, reports, max_retries=3)
        sent = track_many(client, 50)
        flushed = await client.flush(timeout=2)
        assert (flushed.delivered, flushed.pending) == (0, 50)
        started = time.monotonic()
        result = await client.aclose(timeout=2)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    stats = assert_accounted(client, 50)
    assert (stats.delivered, stats.dropped) == (0, 50)
    assert stats.dropped_by_reason == {"network_error": 50}
    assert stats.retried >= 3 * 50
    assert (result.dropped, result.pending) == (50, 0)
    assert (reports[0].type, reports[0].reason) == ("retry_exhausted", "network_error")
    assert (reports[-1].type, reports[-1].reason) == ("dropped", "network_error")
    assert {r.type for r in reports} == {"retry_exhausted", "dropped"}
    assert sorted(dropped_ids(reports)) == sorted(sent)


async def test_unreachable_close_tries_events_queued_behind_a_kept_batch(
    reports: list[DeliveryReport],
) -> None:
    """Events tracked after a batch was kept are tried at close and dropped as network_error."""
    url = f"http://127.0.0.1:{free_port()}"
    with anyio.fail_after(10):
        client = make_client(url, reports, max_retries=3)
        sent = track_many(client, 50)
        flushed = await client.flush(timeout=2)
        sent += track_many(client, 50)
        started = time.monotonic()
        result = await client.aclose(timeout=2)
        elapsed = time.monotonic() - started
    assert (flushed.pending, flushed.timed_out) == (50, False)
    assert elapsed < 3.0  # the deadline itself holds
    stats = assert_accounted(client, 100)
    assert sorted(dropped_ids(reports)) == sorted(sent)
    # Expected: one more attempt for everything, then done; every reason names the failure.
    assert stats.dropped_by_reason == {"network_error": 100}
    assert not result.timed_out


async def test_hanging_server_flush_and_close_meet_their_deadlines(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """Against a server that never answers, flush and aclose return at their deadlines."""
    server.app.faults.mix({Fault.hang(): 1.0})
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        sent = track_many(client, 20)
        started = time.monotonic()
        flushed = await client.flush(timeout=0.5)
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 2.0  # the deadline, not the hang; headroom for a busy machine
        assert (flushed.delivered, flushed.pending, flushed.timed_out) == (0, 20, True)
        stats = client.stats()
        assert (stats.in_flight, stats.batches_in_flight) == (20, 1)
        started = time.monotonic()
        closed = await client.aclose(timeout=1)
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert (closed.delivered, closed.dropped, closed.pending, closed.timed_out) == (0, 20, 0, True)
    stats = assert_accounted(client, 20)
    assert (stats.delivered, stats.dropped) == (0, 20)
    assert [(r.type, r.count) for r in reports] == [("dropped", 20)]
    assert sorted(reports[0].message_ids) == sorted(sent)
    assert server.app.events == []


async def test_retry_after_60_does_not_hold_close(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """Retry-After: 60 on every answer: aclose(timeout=1) still returns within ~2 s, all counted."""
    server.app.faults.mix({Fault.status(429, retry_after="60"): 1.0})
    with anyio.fail_after(10):
        client = make_client(server.url, reports)  # the real anyio.sleep
        sent = track_many(client, 30)
        started = time.monotonic()
        closed = await client.aclose(timeout=1)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert closed.timed_out
    stats = assert_accounted(client, 30)
    assert stats.dropped_by_reason == {"rate_limited": 30}
    assert stats.retried == 30
    assert [(r.type, r.reason) for r in reports] == [("dropped", "rate_limited")]
    assert sorted(dropped_ids(reports)) == sorted(sent)
    assert batch_statuses(server) == [429]


# -- 6. concurrency and head-of-line blocking -------------------------------------------------


async def test_batches_are_delivered_concurrently(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """With server latency and max_concurrency=4, several batches are in flight at once."""
    server.app.faults.latency = 0.2
    with anyio.fail_after(10):
        client = make_client(server.url, reports, max_batch_size=10, max_concurrency=4)
        sent = track_many(client, 80)
        samples: list[int] = []

        def delivered_all() -> bool:
            stats = client.stats()
            samples.append(stats.in_flight)
            return stats.delivered >= 80

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.flush)
            await wait_until(delivered_all)
        await client.aclose(timeout=5)
        peak = max(samples)
    assert peak > 10  # more than one batch of 10 at a time
    assert peak <= 40  # never more than max_concurrency batches
    assert_stored_exactly_once(server, sent)
    assert batch_statuses(server) == [202] * 8
    stats = assert_accounted(client, 80)
    assert stats.delivered == 80


async def test_batch_in_backoff_does_not_block_other_batches(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """While one batch waits out its backoff, the other batches are still delivered."""
    gated = GatedSleep()
    # The first request to arrive fails; the next three succeed slightly later, so the client
    # has seen a success after the failure.
    server.app.faults.script([Fault.status(503)] + [Fault.delay(0.2)] * 3)
    with anyio.fail_after(10):
        client = make_client(server.url, reports, max_batch_size=10, max_concurrency=4, sleep=gated)
        sent = track_many(client, 80)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.flush)
            try:
                await wait_until(lambda: client.stats().delivered >= 70)  # all but one batch
                meanwhile = (len(gated.delays), client.stats().in_flight, len(server.app.events))
            finally:
                gated.gate.set()
        await client.aclose(timeout=5)
    assert meanwhile == (1, 10, 70)  # one batch asleep in backoff, the other seven stored
    assert len(gated.delays) == 1
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 80)
    assert (stats.delivered, stats.retried) == (80, 10)
    assert reports == []


async def test_isolated_failure_in_backoff_does_not_stall_later_batches(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A batch waiting out Retry-After after a one-off 503 does not hold back later batches."""
    gated = GatedSleep()
    server.app.faults.script([Fault.status(503, retry_after="5")])
    with anyio.fail_after(10):
        client = make_client(server.url, reports, max_batch_size=10, max_concurrency=4, sleep=gated)
        sent = track_many(client, 10)  # a full batch: it goes out at once and gets the 503
        await wait_until(lambda: bool(gated.delays))
        sent += track_many(client, 40)  # four more full batches; the server is healthy again
        try:
            with anyio.move_on_after(1.0):
                await wait_until(lambda: client.stats().delivered >= 40)
            delivered_meanwhile = client.stats().delivered
        finally:
            gated.gate.set()
        await client.aclose(timeout=5)
    assert gated.delays == [5.0]
    assert_stored_exactly_once(server, sent)
    assert_accounted(client, 50)
    assert delivered_meanwhile == 40


# -- 7. outage then recovery ------------------------------------------------------------------


async def test_outage_then_recovery_delivers_everything_one_batch_at_a_time(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """During an outage the client buffers and probes one batch at a time, then delivers all."""
    outage = 12
    server.app.faults.script([Fault.status(503)] * outage)
    probe = InFlightSleep()
    with anyio.fail_after(20):
        client = make_client(
            server.url, reports, max_batch_size=10, max_concurrency=4, max_retries=2, sleep=probe
        )
        probe.client = client
        sent = track_many(client, 10)
        first = await client.flush(timeout=5)
        assert (first.delivered, first.pending) == (0, 10)  # kept after exhausted retries
        sent += track_many(client, 30)  # keeps buffering during the outage
        assert client.stats().queued == 40
        for _ in range(20):
            result = await client.flush(timeout=5)
            if result.pending == 0:
                break
        assert client.stats().delivered == 40
        await client.aclose(timeout=5)
    statuses = batch_statuses(server)
    assert statuses[:outage] == [503] * outage
    assert statuses[outage:] == [202] * 4
    assert len(probe.in_flight) == outage - 4  # one backoff per failure except the last of each
    assert max(probe.in_flight) <= 10  # never more than one batch of 10 out while failing
    assert reports
    assert {(r.type, r.reason) for r in reports} == {("retry_exhausted", "server_error")}
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 40)
    assert (stats.delivered, stats.dropped) == (40, 0)
    assert stats.retried > 0


# -- 8. cancellation --------------------------------------------------------------------------


async def test_cancelled_flush_loses_nothing(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """Cancelling a task awaiting flush() mid-delivery loses nothing and delivers nothing twice."""
    server.app.faults.latency = 0.05
    server.app.faults.script([Fault.status(503), Fault.lost_ack()])
    with anyio.fail_after(15):
        client = make_client(server.url, reports, max_batch_size=100)
        sent = track_many(client, 2000)
        task = asyncio.ensure_future(client.flush())
        await wait_until(lambda: client.stats().delivered > 0)  # delivery is under way
        assert client.stats().delivered < 2000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result = await client.aclose(timeout=10)
    assert not result.timed_out
    stats = assert_accounted(client, 2000)
    assert (stats.delivered, stats.dropped) == (2000, 0)
    assert_stored_exactly_once(server, sent)
    assert reports == []


async def test_cancelled_close_then_close_again_loses_nothing(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """A second aclose() after a cancelled one still waits for delivery and accounts for all."""
    server.app.faults.latency = 0.05
    with anyio.fail_after(15):
        client = make_client(server.url, reports, max_batch_size=100)
        sent = track_many(client, 2000)
        task = asyncio.ensure_future(client.aclose())
        await wait_until(lambda: client.stats().delivered > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose(timeout=10)
        stats = client.stats()
        assert stats.tracked == stats.delivered + stats.dropped == 2000
    assert_stored_exactly_once(server, sent)


# -- 9. ordering across an identify ----------------------------------------------------------


async def test_identify_stays_between_its_tracks_across_retries(
    server: LocalServer, reports: list[DeliveryReport]
) -> None:
    """Tracks before an identify are stored before it and tracks after it, even with retries."""
    server.app.faults.script(
        [
            Fault.status(503),  # first batch
            Fault.close(),  # first batch again
            None,  # first batch delivered
            Fault.status(503),  # identify
            None,  # identify delivered
            Fault.lost_ack(),  # second batch stored, answer lost
            None,  # second batch again: deduplicated
        ]
    )
    with anyio.fail_after(10):
        client = make_client(server.url, reports)
        before = track_many(client, 3, "trial_started")
        client.identify("user_1", {"plan": "pro"}, email="ada@example.com")
        after = track_many(client, 3, "plan_upgraded")
        await client.aclose(timeout=5)
    assert [(r.path, r.status) for r in server.app.requests] == [
        (BATCH, 503),
        (BATCH, None),
        (BATCH, 202),
        (IDENTIFY, 503),
        (IDENTIFY, 200),
        (BATCH, None),
        (BATCH, 202),
    ]
    assert stored_ids(server) == before + after
    assert len(server.app.identifies) == 1
    stats = assert_accounted(client, 7)
    assert (stats.delivered, stats.dropped) == (7, 0)
    assert reports == []


# -- trio ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_retries_then_delivers(
    server: LocalServer, reports: list[DeliveryReport], sleeps: Sleeps
) -> None:
    """Under trio, 503/close/429 faults are retried and everything is stored exactly once.

    The close and the lost answer meet a kept-alive connection before any answer byte: that is
    how a server's idle close looks, so the request is sent again at once on a new connection,
    without a backoff sleep or a counted retry.
    """
    server.app.faults.script(
        [Fault.status(503), Fault.close(), Fault.status(429, retry_after="1"), Fault.lost_ack()]
    )
    with anyio.fail_after(10):
        client = make_client(server.url, reports, sleep=sleeps)
        sent = track_many(client, 10)
        await client.aclose(timeout=5)
    assert batch_statuses(server) == [503, None, 429, None, 202]
    assert len(sleeps.delays) == 2  # after the 503 and the 429
    assert sleeps.delays[1] == 1.0
    assert_stored_exactly_once(server, sent)
    stats = assert_accounted(client, 10)
    assert (stats.delivered, stats.retried) == (10, 20)
    assert reports == []
