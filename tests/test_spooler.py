"""The client with a spool (``spool_path``), in process: what goes to the file and when, what
comes back and in which order, the counts and reports, and a file that cannot be used.

The API is an httpx.MockTransport; the spool is a real SQLite file, read back directly with
sqlite3. tests/test_spool.py runs the same claims in real processes against the real server;
tests/test_spool_store.py tests the store alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import whisperr
from whisperr import _events as ev
from whisperr import _runner
from whisperr._ledger import Ledger, in_hook
from whisperr._spool import Spool, SpoolBusy

from .conftest import API_KEY, NOW, Api, Clock

pytestmark = pytest.mark.anyio

WAIT = 10.0  # seconds a condition may take to come true (the spool's thread works meanwhile)


def rows(path: Path) -> list[tuple[str, float, str | None]]:
    """(message_id, occurred_at, owner) of every row in the file, oldest first."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT message_id, occurred_at, owner FROM events ORDER BY occurred_at, id"
        ).fetchall()


async def eventually(condition: Any, timeout: float = WAIT) -> None:
    """Wait (bounded) for ``condition()`` to hold: for the spool's own thread, never a sleep
    that makes a test pass."""
    with anyio.fail_after(timeout):
        # The file, written by another thread: no event to wait on.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def moved_aside(directory: Path) -> list[Path]:
    return list(directory.glob("spool.db.corrupt-*"))


def identity(stats: whisperr.Stats) -> None:
    assert stats.tracked + stats.identified + stats.replayed == (
        stats.delivered + stats.dropped + stats.spooled
    ), stats


def down() -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(503))


def accept_all(request: httpx.Request) -> httpx.Response:
    accepted = request.content.count(b'"$message_id"')
    return httpx.Response(202, json={"accepted": accepted, "rejected": 0})


def client(path: Path, transport: httpx.AsyncBaseTransport, **extra: Any) -> whisperr.AsyncClient:
    options: dict[str, Any] = {
        "api_key": API_KEY,
        "transport": transport,
        "spool_path": path,
        "clock": Clock(),
        "max_retries": 0,
        "backoff_base": 0.0,
        "flush_interval": 60.0,
    }
    return whisperr.AsyncClient(**(options | extra))


async def test_what_is_left_at_close_goes_to_the_file_and_the_next_client_sends_it_first(
    tmp_path: Path, api: Api
) -> None:
    path = tmp_path / "spool.db"
    reports: list[whisperr.DeliveryReport] = []
    first = client(path, down(), on_error=reports.append)
    ids = [first.track(f"user_{i}", "payment_failed", {"i": i}) for i in range(1_200)]
    await first.aclose(timeout=2)
    stats = first.stats()
    assert (stats.spooled, stats.dropped, stats.delivered) == (1_200, 0, 0)
    identity(stats)
    assert [row[0] for row in rows(path)] == ids  # oldest first, every one
    assert {row[2] for row in rows(path)} == {None}  # free for any process to replay
    [spooled] = [r for r in reports if r.type == "spooled"]
    assert spooled.count == 1_200
    assert str(path) in spooled.message
    assert path.stat().st_mode & 0o777 == 0o600
    assert API_KEY.encode() not in path.read_bytes()

    second = client(path, api.transport())
    new = second.track("user_new", "trial_expired")
    await second.aclose()
    stats = second.stats()
    assert (stats.replayed, stats.delivered, stats.spooled, stats.dropped) == (1_200, 1_201, 0, 0)
    identity(stats)
    sent = [e["context"]["$message_id"] for e in api.events]
    assert sent == [*ids, new]  # the spooled events first, with their own ids
    assert {e["occurred_at"] for e in api.events[:1_200]} == {ev.format_timestamp(NOW)}
    assert rows(path) == []


async def test_a_client_that_only_closes_still_sends_the_file(tmp_path: Path, api: Api) -> None:
    """A cron job with nothing to track replays what an earlier run left, within its close."""
    path = tmp_path / "spool.db"
    first = client(path, down())
    for i in range(10):
        first.track("u", "payment_failed", {"i": i})
    await first.aclose(timeout=1)
    second = client(path, api.transport())
    await second.aclose()
    assert second.stats().replayed == second.stats().delivered == 10
    assert len(api.events) == 10
    assert rows(path) == []


async def test_retries_exhausted_then_spooled_with_the_failure_named(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    reports: list[whisperr.DeliveryReport] = []
    c = client(path, down(), on_error=reports.append)
    c.track("u", "payment_failed")
    await c.flush()  # attempted, failed, kept
    await c.aclose(timeout=1)
    [spooled] = [r for r in reports if r.type == "spooled"]
    assert spooled.reason == "server_error"
    assert "503" in spooled.message or "server" in spooled.message
    assert c.stats().spooled == 1
    assert len(rows(path)) == 1


async def test_queue_overflow_goes_to_the_file_instead_of_being_dropped(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    reports: list[whisperr.DeliveryReport] = []
    c = client(path, down(), max_queue_size=10, on_error=reports.append)
    ids = [c.track("u", "payment_failed", {"i": i}) for i in range(100)]
    await eventually(lambda: len(rows(path)) >= 90)  # the spool's thread wrote them
    overflow = [r for r in reports if r.type == "spooled" and r.reason == "queue_overflow"]
    assert sum(r.count for r in overflow) == 90
    assert c.stats().dropped_by_reason.get("queue_overflow", 0) == 0
    await c.aclose(timeout=1)
    stats = c.stats()
    # Spooled events the queue had room for again were replayed, then spooled at close again:
    # counted each time, so the difference is what this client tracked.
    assert (stats.spooled - stats.replayed, stats.dropped) == (100, 0)
    identity(stats)
    assert sorted(row[0] for row in rows(path)) == sorted(ids)


async def test_an_async_hook_gets_the_spools_reports_on_the_event_loop(tmp_path: Path) -> None:
    """The overflow report is made on the spool's own thread: an async on_error hook still
    runs, as a task of the client's event loop, inside the hook's context (before, starting
    it there failed)."""
    path = tmp_path / "spool.db"
    seen: list[tuple[str, str, int]] = []
    loop_thread = threading.get_ident()

    async def hook(report: whisperr.DeliveryReport) -> None:
        assert in_hook.get()  # flush() or aclose() from here returns at once, as documented
        seen.append((report.type, report.reason, threading.get_ident()))

    c = client(path, down(), max_queue_size=10, on_error=hook)
    c.track("u", "payment_failed")
    await c.flush()  # the runner serves this loop (attempted, failed, kept)
    for i in range(100):
        c.track("u", "payment_failed", {"i": i})
    await eventually(lambda: ("spooled", "queue_overflow", loop_thread) in seen)
    await c.aclose(timeout=1)
    assert {thread for _, _, thread in seen} == {loop_thread}


async def test_an_async_hook_gets_a_report_made_before_the_runner_served(tmp_path: Path) -> None:
    """Overflow sent to the file while the loop has not let the runner serve yet is reported on
    the spool's thread with no task group of the runner open: the hook waits, and the runner's
    first step starts it on the loop, in the hook's context (before, it was skipped with a
    warning, "called outside the runner")."""
    path = tmp_path / "spool.db"
    called: list[int] = []  # the threads on_error was called on
    seen: list[tuple[str, str, int]] = []
    loop_thread = threading.get_ident()

    async def hook(report: whisperr.DeliveryReport) -> None:
        assert in_hook.get()
        seen.append((report.type, report.reason, threading.get_ident()))

    def on_error(report: whisperr.DeliveryReport) -> Any:
        called.append(threading.get_ident())
        return hook(report)

    c = client(path, down(), max_queue_size=10, on_error=on_error)
    for i in range(100):
        c.track("u", "payment_failed", {"i": i})
    # This task holds the loop (no await), so the runner cannot have served: wait, bounded,
    # for the spool's thread to report the overflow.
    deadline = time.monotonic() + WAIT
    while not called and time.monotonic() < deadline:
        time.sleep(0.01)  # noqa: ASYNC251 (holding the loop is the point)
    assert called
    assert loop_thread not in called
    await eventually(lambda: ("spooled", "queue_overflow", loop_thread) in seen)
    await c.aclose(timeout=1)
    assert {thread for _, _, thread in seen} == {loop_thread}


def report_on_another_thread(ledger: Ledger) -> None:
    """A report made the way the spool's worker makes one: on its own thread."""
    worker = threading.Thread(
        target=ledger.report, args=("dropped", "spool_full", "evicted", None, 1, ("m1",))
    )
    worker.start()
    worker.join()


def test_an_async_hook_gets_a_report_made_on_another_thread_while_nothing_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the client idle (its own thread ended, so no task group is open), a report made on
    another thread wakes the runner, whose stay starts the hook (before, it was skipped)."""
    monkeypatch.setattr(_runner, "LINGER", 0.0)  # the own thread ends as soon as it is idle
    ran = threading.Event()
    seen: list[tuple[str, bool]] = []

    async def hook(report: whisperr.DeliveryReport) -> None:
        seen.append((report.reason, in_hook.get()))
        ran.set()

    c = whisperr.Client(api_key=API_KEY, transport=httpx.MockTransport(accept_all), on_error=hook)
    try:
        c.track("u", "payment_failed")
        c.flush()
        deadline = time.monotonic() + WAIT
        while c._runner.host_kind != "none" and time.monotonic() < deadline:
            time.sleep(0.01)  # a condition with a deadline: the own thread ends by itself
        assert c._runner.host_kind == "none"
        report_on_another_thread(c._async._ledger)
        assert ran.wait(WAIT)
        assert seen == [("spool_full", True)]
    finally:
        c.close()


def test_a_report_made_after_the_close_closes_its_async_hook_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No stay comes once the client is closed: the hook's coroutine is closed (no "never
    awaited" warning at exit) and a warning says it was not run, instead of silence."""
    made: list[Any] = []
    ran: list[str] = []

    async def hook(report: whisperr.DeliveryReport) -> None:
        ran.append(report.reason)

    def on_error(report: whisperr.DeliveryReport) -> Any:
        made.append(hook(report))
        return made[-1]

    c = whisperr.Client(
        api_key=API_KEY, transport=httpx.MockTransport(accept_all), on_error=on_error
    )
    c.close()
    with caplog.at_level(logging.WARNING, logger="whisperr"):
        report_on_another_thread(c._async._ledger)
    assert len(made) == 1
    assert made[0].cr_frame is None  # closed, never run
    assert ran == []
    assert list(c._async._ledger.waiting_hooks) == []
    assert "1 async on_error hook call(s) not run: the client closed" in caplog.text


async def test_a_hook_handed_to_a_group_that_just_ended_wakes_the_runner() -> None:
    """Another thread may call the starter of a stay's group just as the group ends, after its
    last start_waiting(): the hook waits, and the ledger's wake (the runner's kick) is called,
    so that the stay's end restarts for it or a new stay starts it (before, it waited for the
    next event)."""
    ledger = Ledger(on_error=None)
    woken: list[str] = []
    ledger.wake = lambda: woken.append("kick")
    loop = asyncio.get_running_loop()
    host = _runner.Host(loop.call_soon_threadsafe, loop, own=False, thread=threading.get_ident())

    async def hook() -> None:
        raise AssertionError("not started here")

    async with anyio.create_task_group() as tg:
        starter = _runner.HookStarter(tg, host, ledger)
        ledger.spawn = None  # the stay's end unset it: this starter's group is ending
        waiting = hook()
        worker = threading.Thread(target=starter, args=(waiting,))
        worker.start()
        worker.join()
    assert woken == ["kick"]
    assert [hook for _, hook in ledger.waiting_hooks] == [waiting]
    ledger.drop_waiting_hooks("the test ends")


def test_a_forked_childs_ledger_closes_the_parents_waiting_hooks_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a fork child the parent's waiting hooks are the parent's (it runs its copies): the
    child's copies are closed, so they never warn "never awaited", and nothing is logged."""
    ledger = Ledger(on_error=None)

    async def hook() -> None:
        raise AssertionError("a closed hook never runs")

    waiting = hook()
    ledger.waiting_hooks.append((contextvars.copy_context(), waiting))
    with caplog.at_level(logging.DEBUG, logger="whisperr"):
        ledger.reset()
    assert waiting.cr_frame is None
    assert list(ledger.waiting_hooks) == []
    assert caplog.text == ""


async def test_identifies_are_never_spooled(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    c = client(path, down())
    c.identify("u", {"plan": "pro"})
    c.track("u", "payment_failed")
    await c.aclose(timeout=1)
    stats = c.stats()
    assert (stats.spooled, stats.dropped, stats.identified) == (1, 1, 1)  # the identify dropped
    identity(stats)
    assert len(rows(path)) == 1


async def test_spooled_events_past_the_api_window_are_dropped_as_expired(
    tmp_path: Path, api: Api
) -> None:
    path = tmp_path / "spool.db"
    clock = Clock()
    first = client(path, down(), clock=clock)
    first.track("u", "payment_failed")
    await first.aclose(timeout=1)
    clock.now = NOW + ev.MAX_PAST  # thirty days later
    reports: list[whisperr.DeliveryReport] = []
    second = client(path, api.transport(), clock=clock, on_error=reports.append)
    await second.aclose()
    stats = second.stats()
    assert (stats.replayed, stats.dropped_by_reason, stats.delivered) == (1, {"expired": 1}, 0)
    assert [r.reason for r in reports if r.type == "dropped"] == ["expired"]
    assert api.events == []
    assert rows(path) == []


async def test_always_writes_every_queued_event_within_the_window_and_forgets_delivered(
    tmp_path: Path, api: Api
) -> None:
    path = tmp_path / "spool.db"
    hold = anyio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        # The first batch stays in flight while the file is looked at, without blocking the
        # loop (a blocking wait here held the loop, and the look with it, for WAIT).
        await hold.wait()
        return api(request)

    c = client(path, httpx.MockTransport(held), spool_mode="always", spool_sync_interval=0.05)
    ids = {c.track("u", "payment_failed", {"i": i}) for i in range(50)}
    flushing = anyio.Event()

    async def flush() -> None:
        await c.flush()
        flushing.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(flush)
        await eventually(lambda: {row[0] for row in rows(path)} == ids)
        assert None not in {row[2] for row in rows(path)}  # owned: no other process replays them
        hold.set()
        await flushing.wait()
    await eventually(lambda: rows(path) == [])  # delivered: deleted in the next turn
    await c.aclose()
    assert c.stats().delivered == 50


async def test_always_then_close_with_the_server_down_leaves_everything_free(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    c = client(path, down(), spool_mode="always")
    ids = [c.track("u", "payment_failed", {"i": i}) for i in range(700)]
    await c.aclose(timeout=1)
    stats = c.stats()
    assert (stats.spooled, stats.dropped) == (700, 0)
    identity(stats)
    assert [row[0] for row in rows(path)] == ids
    assert {row[2] for row in rows(path)} == {None}  # released for the next client


async def test_a_corrupt_file_is_moved_aside_and_the_client_delivers(
    tmp_path: Path, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database, " * 100)
    with caplog.at_level(logging.ERROR, logger="whisperr"):
        c = client(path, api.transport())
    [aside] = moved_aside(tmp_path)
    assert aside.read_bytes().startswith(b"this is not a database")
    assert any(str(aside) in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    c.track("u", "payment_failed")
    await c.aclose()
    assert c.stats().delivered == 1
    assert len(api.events) == 1


async def test_a_spool_that_cannot_be_made_leaves_the_client_in_memory(
    tmp_path: Path, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "spool.db"  # under a file: no directory can hold it
    with caplog.at_level(logging.ERROR, logger="whisperr"):
        c = client(path, api.transport())
    assert any(r.levelname == "ERROR" for r in caplog.records)
    c.track("u", "payment_failed")
    await c.aclose()
    assert c.stats().delivered == 1


async def test_a_locked_file_never_blocks_track_and_is_written_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the file: the spool's thread meets the lock and waits a turn;
    track() never touches the file, on any path."""
    calls: list[tuple[str, str]] = []  # (thread name, outcome) of every write to the file
    add = Spool.add

    def recorded(self: Spool, items: Any, *, owned: bool) -> Any:
        try:
            added = add(self, items, owned=owned)
        except SpoolBusy:
            calls.append((threading.current_thread().name, "busy"))
            raise
        calls.append((threading.current_thread().name, "written"))
        return added

    monkeypatch.setattr(Spool, "add", recorded)
    path = tmp_path / "spool.db"
    c = client(path, down(), spool_mode="always", spool_sync_interval=0.02)
    c.track("u", "warm_up")
    await eventually(lambda: len(rows(path)) == 1)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(200):
            c.track("u", "payment_failed", {"i": i})
        await eventually(lambda: ("whisperr-spool", "busy") in calls)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await eventually(lambda: len(rows(path)) == 201)
    assert {name for name, _ in calls} == {"whisperr-spool"}  # never the tracking thread
    await c.aclose(timeout=1)
    assert c.stats().spooled == 201


async def test_where_no_thread_may_start_the_claims_run_on_the_closing_thread(
    tmp_path: Path, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter exit (3.12+) no thread starts: a client whose spool worker never ran
    still sends the file within its close, instead of waiting for a claim that cannot come."""
    path = tmp_path / "spool.db"
    first = client(path, down())
    for i in range(3):
        first.track("u", "payment_failed", {"i": i})
    await first.aclose(timeout=1)

    def refuse(name: str, target: Any, *args: Any) -> Any:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr("whisperr._spooler._exit.start_blocking_signals", refuse)
    second = client(path, api.transport(), shutdown_timeout=30)
    with anyio.fail_after(5):  # a claim left waiting would hold the close for 30 s
        await second.aclose()
    assert (second.stats().replayed, second.stats().delivered) == (3, 3)
    assert rows(path) == []
