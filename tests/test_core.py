"""The core's parts through the public API: intake bounds, aggregated reports, the environment,
hooks that call back into the client, other loops and threads; and the scheduler's policy."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import anyio
import httpx
import pytest

import whisperr
from whisperr._batches import Batch
from whisperr._config import Settings
from whisperr._intake import ITEM_OVERHEAD, Intake
from whisperr._ledger import Ledger
from whisperr._schedule import Scheduler
from whisperr._transport import Outcome

from .conftest import API_KEY, NOW, Api

pytestmark = pytest.mark.anyio


def overflow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "queue_overflow" in r.getMessage()]


class TestIntake:
    async def test_overflow_is_reported_once_per_reason_and_interval(
        self, settings: dict[str, Any], reports: list[Any], caplog: pytest.LogCaptureFixture
    ) -> None:
        """9,000 overflow drops make one report and one log line, with every message id."""
        caplog.set_level(logging.WARNING, "whisperr")
        client = whisperr.AsyncClient(**settings, max_queue_size=1000, on_error=reports.append)
        mids = [client.track("u", "a_b") for _ in range(10_000)]
        await client.flush()
        overflow = [r for r in reports if r.reason == "queue_overflow"]
        assert len(overflow) == 1
        assert overflow[0].count == 9000
        assert overflow[0].message_ids == tuple(mids[:9000])
        assert len(overflow_lines(caplog)) == 1
        # Drops after that report wait for the next interval (60 s here) or the close.
        for _ in range(1500):
            client.track("u", "a_b")
        await client.flush()
        assert len([r for r in reports if r.reason == "queue_overflow"]) == 1
        await client.aclose()
        overflow = [r for r in reports if r.reason == "queue_overflow"]
        assert [r.count for r in overflow] == [9000, 500]
        assert len(overflow_lines(caplog)) == 2
        stats = client.stats()
        assert stats.tracked == stats.delivered + stats.dropped == 11_500

    async def test_max_queue_bytes_drops_the_oldest(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """Large events stop growing the queue at max_queue_bytes; the newest are kept."""
        blob = {"blob": "x" * 4000}  # 4,011 bytes encoded
        client = whisperr.AsyncClient(**settings, max_queue_bytes=10 * 4011)
        mids = [client.track("u", "a_b", blob) for _ in range(100)]
        stats = client.stats()
        assert stats.queued == 10
        assert stats.dropped_by_reason == {"queue_overflow": 90}
        assert stats.queued_bytes == 10 * (4011 + ITEM_OVERHEAD)
        await client.aclose()
        assert [e["context"]["$message_id"] for e in api.events] == mids[90:]

    async def test_an_event_larger_than_max_queue_bytes_is_refused(
        self, settings: dict[str, Any], reports: list[Any]
    ) -> None:
        """An event alone above the byte bound is dropped, counted and reported, never queued."""
        client = whisperr.AsyncClient(**settings, max_queue_bytes=5000, on_error=reports.append)
        client.track("u", "a_b", {"blob": "x" * 6000})
        assert client.stats().queued == 0
        await client.aclose()
        assert [(r.reason, r.count) for r in reports] == [("queue_overflow", 1)]
        stats = client.stats()
        assert stats.tracked == stats.dropped == 1

    async def test_queued_bytes_follows_the_queue(self, settings: dict[str, Any]) -> None:
        """queued_bytes counts the encoded events queued, and returns to 0 when delivered."""
        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "a_b", {"k": "v" * 100})
            client.track("u", "a_b", None, {"c": 1})
            expected = len(b'{"k":"' + b"v" * 100 + b'"}') + len(b"{}")
            context = len(b'{"sdk_name":"whisperr-python-async","sdk_version":"')
            assert client.stats().queued_bytes > expected + context + 2 * ITEM_OVERHEAD
            await client.flush()
            assert client.stats().queued_bytes == 0


class TestEnvironment:
    async def test_constructors_read_whisperr_variables(
        self, monkeypatch: pytest.MonkeyPatch, api: Api
    ) -> None:
        """AsyncClient(), Client() and Settings() take WHISPERR_* for settings not passed."""
        monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
        monkeypatch.setenv("WHISPERR_BASE_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("WHISPERR_FLUSH_INTERVAL", "7.5")
        for settings in (
            Settings(),
            whisperr.AsyncClient(transport=api.transport()).settings,
            whisperr.Client(transport=api.transport()).settings,
        ):
            assert settings.api_key == API_KEY
            assert settings.base_url == "http://127.0.0.1:9"
            assert settings.flush_interval == 7.5
        explicit = whisperr.AsyncClient(flush_interval=2.0, base_url="http://localhost:1")
        assert (explicit.settings.flush_interval, explicit.settings.base_url) == (
            2.0,
            "http://localhost:1",
        )

    def test_a_bad_variable_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
        monkeypatch.setenv("WHISPERR_MAX_QUEUE_BYTES", "lots")
        with pytest.raises(whisperr.ConfigError, match="WHISPERR_MAX_QUEUE_BYTES"):
            whisperr.AsyncClient()

    def test_from_env_reads_only_the_mapping_given(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WHISPERR_FLUSH_INTERVAL", "7.5")
        settings = Settings.from_env({"WHISPERR_API_KEY": API_KEY})
        assert settings.flush_interval == 1.0


class TestCallsFromHooks:
    async def test_an_async_hook_awaiting_aclose_does_not_deadlock(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """A hook may await aclose(): it starts the close; the app's own aclose() returns."""
        api.default = 400
        client: whisperr.AsyncClient

        async def hook(report: whisperr.DeliveryReport) -> None:
            await client.aclose()
            await client.flush()
            client.stats()

        client = whisperr.AsyncClient(**settings, on_error=hook, shutdown_timeout=3)
        for _ in range(10):
            client.track("u", "a_b")
        with anyio.fail_after(5):
            await client.flush()
            result = await client.aclose()
        assert not result.timed_out
        stats = client.stats()
        assert stats.tracked == stats.dropped == 10

    def test_a_sync_clients_hook_may_flush_close_and_read_stats(self, api: Api) -> None:
        """On the delivery thread, flush() and close() start their work and return at once."""
        api.default = 400
        seen: list[Any] = []
        client: whisperr.Client

        def hook(report: whisperr.DeliveryReport) -> None:
            seen.append((client.flush(timeout=5), client.stats().dropped))
            client.close()

        client = whisperr.Client(
            api_key=API_KEY, transport=api.transport(), on_error=hook, shutdown_timeout=3
        )
        client.track("u", "a_b")
        done = threading.Event()
        closer = threading.Thread(target=lambda: (client.close(), done.set()))
        closer.start()
        assert done.wait(5), "close() did not return"
        closer.join()
        assert len(seen) == 1
        flushed, dropped = seen[0]
        assert (flushed.timed_out, flushed.pending) == (False, 0)  # started, not waited for
        assert dropped == 1
        assert client.stats().tracked == client.stats().dropped == 1


class TestOtherLoopsAndThreads:
    async def test_flush_and_aclose_from_a_second_loop_in_another_thread(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """A client serving this loop is flushed and closed from another thread's loop."""
        client = whisperr.AsyncClient(**settings)
        client.track("u", "first")
        await client.flush()  # the runner now lives in this loop
        results: list[Any] = []

        async def other() -> None:
            mids = [client.track("u", "a_b") for _ in range(200)]
            with anyio.fail_after(5):
                results.append(await client.flush(timeout=5))
                results.append(await client.aclose())
            results.append(mids)

        thread = threading.Thread(target=asyncio.run, args=(other(),))
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        flushed, closed, mids = results
        assert (flushed.timed_out, flushed.delivered) == (False, 200)
        assert not closed.timed_out
        assert [e["context"]["$message_id"] for e in api.events][1:] == mids
        stats = client.stats()
        assert (stats.tracked, stats.delivered, stats.dropped) == (201, 201, 0)

    def test_tracks_from_threads_without_a_loop_are_delivered(self, api: Api) -> None:
        """With no event loop anywhere, the client's own thread delivers."""
        client = whisperr.AsyncClient(api_key=API_KEY, transport=api.transport())

        def work() -> None:
            for _ in range(500):
                client.track("u", "a_b")

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "own thread" in repr(client)
        result = asyncio.run(client.aclose(timeout=5))
        assert not result.timed_out
        assert len(api.events) == 2000
        assert len({e["context"]["$message_id"] for e in api.events}) == 2000


def make_scheduler(max_queue: int = 1000, **overrides: Any) -> tuple[Scheduler, Intake, Ledger]:
    settings = Settings(api_key=API_KEY, flush_interval=1.0, clock=lambda: NOW, **overrides)
    ledger = Ledger(None)
    intake = Intake(
        max_size=max_queue, max_bytes=10**9, drop_newest=False, ledger=ledger, wake=lambda: None,
        disabled=False,
    )  # fmt: skip
    return Scheduler(settings, intake, ledger, b"{}"), intake, ledger


def put_tracks(intake: Intake, n: int) -> None:
    for i in range(n):
        intake.put(("u", "a_b", NOW, b"{}", f"id-{intake.end}-{i}"), 2)


def put_identify(intake: Intake) -> None:
    intake.put(("u", None, NOW, b'{"external_user_id":"u"}', ""), 24)


RETRY = Outcome("retry", "server_error", "the server answered 503", 503)
OK = Outcome("ok", "ok", "delivered", 202)


class TestScheduler:
    @pytest.mark.parametrize(
        ("queued", "now", "flushing", "expected"),
        [
            (0, 0.0, False, None),  # nothing queued
            (3, 0.0, False, None),  # a partial batch waits for its interval
            (3, 0.0, True, 3),  # a flush sends it now
            (500, 0.0, False, 500),  # a full batch goes at once
            (700, 0.0, False, 500),  # at most max_batch_size
        ],
    )
    def test_which_batch_goes_next(
        self, queued: int, now: float, flushing: bool, expected: int | None
    ) -> None:
        scheduler, intake, _ = make_scheduler()
        put_tracks(intake, queued)
        if flushing:
            scheduler.barriers.add(intake.end)
        batch = scheduler.ready_batch(now)
        assert (None if batch is None else len(batch.items)) == expected

    def test_a_close_sends_a_partial_batch_now(self) -> None:
        scheduler, intake, _ = make_scheduler()
        put_tracks(intake, 3)
        assert scheduler.ready_batch(0.0) is None
        batch = scheduler.ready_batch(0.0, closing=True)
        assert batch is not None
        assert len(batch.items) == 3

    def test_the_interval_starts_with_the_first_look(self) -> None:
        scheduler, intake, _ = make_scheduler()
        put_tracks(intake, 3)
        assert scheduler.ready_batch(10.0) is None
        assert scheduler.next_deadline(10.0) == pytest.approx(1.0)
        assert scheduler.ready_batch(10.99) is None
        batch = scheduler.ready_batch(11.0)
        assert batch is not None
        assert len(batch.items) == 3

    def test_an_identify_waits_for_the_tracks_before_it(self) -> None:
        scheduler, intake, ledger = make_scheduler()
        put_tracks(intake, 2)
        put_identify(intake)
        put_tracks(intake, 2)
        scheduler.barriers.add(intake.end)
        first = scheduler.ready_batch(0.0)
        assert first is not None
        assert not first.identify
        assert scheduler.ready_batch(0.0) is None  # the identify waits for the tracks
        scheduler.settle(first, OK, 0.0)
        identify = scheduler.ready_batch(0.0)
        assert identify is not None
        assert identify.identify
        assert scheduler.ready_batch(0.0) is None  # the tracks after it wait for it
        scheduler.settle(identify, OK, 0.0)
        last = scheduler.ready_batch(0.0)
        assert last is not None
        assert len(last.items) == 2
        assert ledger.delivered == 3

    def test_after_repeated_failures_one_batch_probes(self) -> None:
        scheduler, intake, _ = make_scheduler(max_batch_size=10)
        put_tracks(intake, 50)
        batches = [scheduler.ready_batch(0.0) for _ in range(3)]
        assert all(b is not None for b in batches)  # several in flight while all is well
        scheduler.attempted(RETRY)
        scheduler.attempted(RETRY)
        assert scheduler.ready_batch(0.0) is None  # failing: no more while three are out
        for batch in batches:
            assert isinstance(batch, Batch)
            scheduler.settle(batch, RETRY, 0.0)  # retries exhausted: kept, paused
        assert scheduler.retained_events == 30
        assert scheduler.ready_batch(0.0) is None  # paused
        probe = scheduler.ready_batch(1000.0)
        assert probe is not None
        assert scheduler.ready_batch(1000.0) is None  # one probe at a time
        scheduler.attempted(OK)
        scheduler.settle(probe, OK, 1000.0)
        assert scheduler.ready_batch(1000.0) is not None  # full speed again

    def test_a_flush_settles_when_everything_before_it_did(self) -> None:
        scheduler, intake, _ = make_scheduler()
        put_tracks(intake, 3)
        waiter = scheduler.barriers.add(intake.end)
        put_tracks(intake, 3)  # after the flush began: not waited for
        batch = scheduler.ready_batch(0.0)
        assert batch is not None
        scheduler.release_waiters()
        assert not waiter.done.is_set()
        scheduler.settle(batch, OK, 0.0)
        scheduler.release_waiters()
        assert waiter.done.is_set()

    def test_a_cut_off_batch_is_sent_again_first(self) -> None:
        scheduler, intake, _ = make_scheduler(max_batch_size=2)
        put_tracks(intake, 4)
        scheduler.barriers.add(intake.end)
        first = scheduler.ready_batch(0.0)
        assert first is not None
        scheduler.cut_off()  # its host went away mid-request
        assert (scheduler.in_flight_events, scheduler.retained_events) == (0, 2)
        again = scheduler.ready_batch(0.0)
        assert again is not None
        assert again.items == first.items


def test_transport_errors_name_the_last_failure_at_close(api: Api) -> None:
    """While retrying, last_error names the failure; the close-time report repeats it."""
    api.script = [httpx.ConnectError("name resolution failed")] * 50
    reports: list[Any] = []
    client = whisperr.AsyncClient(
        api_key=API_KEY, transport=api.transport(), on_error=reports.append,
        backoff_base=0.001, backoff_cap=0.001, max_retries=2, shutdown_timeout=0.5,
    )  # fmt: skip

    async def main() -> None:
        client.track("u", "a_b")
        with anyio.move_on_after(0.2):
            await client.flush()
        last = client.stats().last_error
        assert last is not None
        assert "name resolution failed" in last.message
        await client.aclose()

    asyncio.run(main())
    dropped = [r for r in reports if r.type == "dropped"]
    assert dropped
    assert "name resolution failed" in dropped[-1].message
    stats = client.stats()
    assert stats.tracked == stats.dropped == 1


def test_a_failing_runner_releases_its_waiters(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error in the runner is logged and never leaves flush() or close() hanging;
    the events stay queued and the next use starts a runner again."""
    from whisperr._delivery import Delivery

    original = Delivery.open

    def broken(self: Delivery) -> httpx.AsyncClient:
        raise RuntimeError("no pool today")

    monkeypatch.setattr(Delivery, "open", broken)
    client = whisperr.Client(api_key=API_KEY, transport=api.transport())
    client.track("u", "a_b")
    result = client.flush()  # no timeout: it must still return
    assert result.pending == 1
    assert "no pool today" in caplog.text
    monkeypatch.setattr(Delivery, "open", original)
    client.track("u", "a_b")
    assert not client.flush(timeout=5).timed_out
    assert len(api.events) == 2
    client.close()


class TestRaces:
    def test_a_close_while_the_own_thread_ends_still_delivers(
        self, api: Api, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An event tracked, then a close, while the idle own thread is ending: the close is
        served by another stay, and the event is delivered, not lost or dropped."""
        import whisperr._runner

        monkeypatch.setattr(whisperr._runner, "LINGER", 0.01)
        entered, release = threading.Event(), threading.Event()

        class HeldClose(httpx.MockTransport):
            async def aclose(self) -> None:
                entered.set()
                await anyio.to_thread.run_sync(release.wait, 5)

        client = whisperr.Client(api_key=API_KEY, transport=HeldClose(api), shutdown_timeout=5)
        client.track("u", "a_b", message_id="first")
        assert not client.flush(timeout=5).timed_out
        assert entered.wait(5), "the idle own thread did not end"
        client.track("u", "a_b", message_id="second")  # its wake reaches the ending stay only
        closer = threading.Thread(target=client.close)
        closer.start()
        while "closing" not in repr(client) and closer.is_alive():
            closer.join(0.005)
        release.set()
        closer.join(5)
        assert not closer.is_alive()
        assert [e["context"]["$message_id"] for e in api.events] == ["first", "second"]
        stats = client.stats()
        assert (stats.tracked, stats.delivered, stats.dropped) == (2, 2, 0)

    def test_a_flush_that_starts_after_the_close_returns(self) -> None:
        """A waiter added once the client closed is done at once: nothing will settle it."""
        from whisperr._schedule import FlushBarriers

        barriers = FlushBarriers()
        before = barriers.add(10)
        barriers.close()
        assert before.done.is_set()
        assert barriers.add(20).done.is_set()

    def test_track_never_raises_when_delivery_cannot_start(
        self, api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No file descriptor for a loop: track() still returns its id; the next use retries."""
        import whisperr._runner

        def no_loop() -> Any:
            raise OSError(24, "Too many open files")

        original = whisperr._runner._own_loop
        monkeypatch.setattr(whisperr._runner, "_own_loop", no_loop)
        client = whisperr.Client(api_key=API_KEY, transport=api.transport())
        first = client.track("u", "a_b")
        assert "could not start delivery" in caplog.text
        monkeypatch.setattr(whisperr._runner, "_own_loop", original)
        second = client.track("u", "a_b")
        client.close(timeout=5)
        assert [e["context"]["$message_id"] for e in api.events] == [first, second]


class TestCaptureEdges:
    async def test_a_user_id_that_escapes_large_is_measured(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """An event accepted at capture can be sent: a user id of control characters (six
        bytes each in JSON) that cannot fit in max_batch_bytes is refused, naming the field;
        one that fits is sent."""
        async with whisperr.AsyncClient(**settings, max_batch_bytes=4096) as client:
            with pytest.raises(whisperr.InvalidEventError) as info:
                client.track("\x01" * 1000, "a_b")
            assert info.value.field == "external_user_id"
            fits = client.track("\x01" * 500, "a_b", {"k": "v" * 500})
        assert [e["context"]["$message_id"] for e in api.events] == [fits]
        assert client.stats().dropped == 0

    async def test_a_lying_str_subclass_cannot_skip_the_event_type_check(
        self, settings: dict[str, Any], api: Api
    ) -> None:
        """A str subclass that compares and hashes like a known type is still validated, and
        what is queued is an exact str."""

        class Lying(str):
            def __eq__(self, other: object) -> bool:
                return True

            def __hash__(self) -> int:
                return hash("payment_failed")

        async with whisperr.AsyncClient(**settings) as client:
            client.track("u", "payment_failed")  # now a known type
            with pytest.raises(whisperr.InvalidEventError, match="event_type"):
                client.track("u", Lying('x","injected":"1'))
            client.track("u", Lying("plan_upgraded"))
        assert [e["event_type"] for e in api.events] == ["payment_failed", "plan_upgraded"]

    def test_a_datetime_whose_tzinfo_raises_is_refused(self, api: Api) -> None:
        """orjson would crash the process on it; it is refused naming the field instead, and
        other dates and times are encoded as orjson writes them."""
        import datetime as dt

        class Broken(dt.tzinfo):
            def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
                raise ValueError("no offset today")

            def dst(self, when: dt.datetime | None) -> None:
                return None

        client = whisperr.AsyncClient(api_key=API_KEY, transport=api.transport())
        bad = dt.datetime(2026, 1, 1, tzinfo=Broken())
        for field in ("properties", "context"):
            kwargs: dict[str, Any] = {field: {"at": bad}}
            with pytest.raises(whisperr.InvalidEventError, match="no offset today") as info:
                client.track("u", "a_b", **kwargs)
            assert info.value.field == field
        when = dt.datetime(2026, 1, 1, 1, 2, 3, 456789, tzinfo=dt.timezone.utc)
        client.track("u", "a_b", {"at": when, "day": when.date(), "time": when.time()})
        asyncio.run(client.aclose())
        assert api.events[0]["properties"] == {
            "at": "2026-01-01T01:02:03.456789+00:00",
            "day": "2026-01-01",
            "time": "01:02:03.456789",
        }


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM"), reason="needs SIGTERM")
def test_exit_on_sigterm_chains_and_installs_once() -> None:
    """The handler raises SystemExit(143) after calling the one installed before; a second call
    installs nothing more."""
    import signal

    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        whisperr.exit_on_sigterm()
        installed = signal.getsignal(signal.SIGTERM)
        whisperr.exit_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is installed
        assert callable(installed)
        with pytest.raises(SystemExit) as info:
            installed(signal.SIGTERM, None)
        assert info.value.code == 143
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
