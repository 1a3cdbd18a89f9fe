"""send() and identify_now(): one event delivered now, with a receipt or a SendError.

Through the public API, against the bundled server on a real socket (what it stored is what
counts) and against httpx.MockTransport for answers the server does not give.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
import typing
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
import orjson
import pytest

import whisperr
from whisperr.server import Fault, LocalServer, ReceiptShape, create_app
from whisperr.testing import Capture

from .conftest import API_KEY, Sleeps

pytestmark = pytest.mark.anyio
# A replayed event's time: an hour ago, to the second.
WHEN = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


def client_for(url: str, **overrides: Any) -> whisperr.AsyncClient:
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": url, "flush_interval": 60.0}
    return whisperr.AsyncClient(**(options | overrides))


def started_hook() -> tuple[httpx.AsyncClient, anyio.Event]:
    """An http_client, and an event set when it sends its first /v1/events/track request."""
    started = anyio.Event()

    async def hook(request: httpx.Request) -> None:
        if request.url.path == "/v1/events/track":
            started.set()

    return httpx.AsyncClient(event_hooks={"request": [hook]}, trust_env=False), started


def track_requests(server: LocalServer) -> list[int | None]:
    return [r.status for r in server.app.requests if r.path == "/v1/events/track"]


# -- receipts ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", typing.get_args(ReceiptShape))
async def test_each_documented_receipt_shape_is_read(shape: Any) -> None:
    with LocalServer(create_app(api_key=API_KEY, receipt=shape)) as server:
        async with client_for(server.url) as client:
            receipt = await client.send("user_1", "payment_failed", {"amount_cents": 4900})
            again = await client.send("user_1", "payment_failed", message_id=receipt.message_id)
        assert [e["context"]["$message_id"] for e in server.app.events] == [receipt.message_id]
    assert (receipt.sent, receipt.status, receipt.attempts) == (True, 202, 1)
    fields = (receipt.event_id, receipt.mapping_status, receipt.processing, receipt.delivery_id)
    if shape == "event":
        assert fields == ("evt_00000001", "mapped", None, None)
        assert receipt.answer["user"] == {"external_user_id": "user_1"}
    elif shape == "queued":
        assert fields == (None, "pending", "queued", None)
    else:
        assert fields == (None, None, "durably_accepted", "dlv_00000001")
        assert (receipt.disposition, receipt.duplicate) == ("accepted", False)
        assert (again.disposition, again.duplicate) == ("duplicate", True)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"", (None, None, None, None)),
        (b"not json", (None, None, None, None)),
        (b"[1, 2]", (None, None, None, None)),
        (  # unknown fields are kept in answer; numbers as ids become text; odd types are None
            b'{"event": {"id": 17, "mapping_status": ["x"]}, "delivery": {"duplicate": "yes"},'
            b' "processing": "queued", "new_field": {"a": 1}}',
            ("17", None, "queued", None),
        ),
        (b'{"event": "evt_1", "delivery": [], "processing": 3}', (None, None, None, None)),
    ],
)
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_receipt_is_read_leniently(
    answer: bytes, expected: tuple[Any, ...], anyio_backend: str
) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(202, content=answer))
    async with whisperr.AsyncClient(api_key=API_KEY, transport=transport) as client:
        receipt = await client.send("user_1", "payment_failed")
    got = (receipt.event_id, receipt.mapping_status, receipt.processing, receipt.duplicate)
    assert got == expected
    if answer.startswith(b"{"):
        assert dict(receipt.answer) == orjson.loads(answer)


# -- retries -------------------------------------------------------------------------------


async def test_503_then_202_is_one_receipt_same_body_retry_after_honoured(
    server: LocalServer, sleeps: Sleeps
) -> None:
    server.app.faults.script([Fault.status(503, retry_after="1")])
    bodies: list[bytes] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path == "/v1/events/track":
            bodies.append(request.content)

    http = httpx.AsyncClient(event_hooks={"request": [record]}, trust_env=False)
    async with http, client_for(server.url, http_client=http, sleep=sleeps) as client:
        receipt = await client.send("user_1", "plan_upgraded", occurred_at=WHEN)
    assert track_requests(server) == [503, 202]
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    event = orjson.loads(bodies[0])
    assert event["context"]["$message_id"] == receipt.message_id
    assert event["occurred_at"] == WHEN.replace("Z", ".000Z")  # as given, not re-stamped
    assert sleeps.delays == [1.0]
    assert (receipt.attempts, receipt.status) == (2, 202)
    assert [e["context"]["$message_id"] for e in server.app.events] == [receipt.message_id]


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_request"), (401, "missing_api_key"), (403, "server_key_required"), (413, None)],
)
async def test_4xx_is_not_retried_and_not_retryable(
    status: int, code: str | None, sleeps: Sleeps
) -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        error = {"code": code, "message": "no", "request_id": "req_1"} if code else {}
        return httpx.Response(status, json={"error": error})

    reports: list[whisperr.DeliveryReport] = []
    async with whisperr.AsyncClient(
        api_key=API_KEY,
        transport=httpx.MockTransport(answer),
        sleep=sleeps,
        on_error=reports.append,
    ) as client:
        with pytest.raises(whisperr.SendError) as info:
            await client.send("user_1", "payment_failed")
    error = info.value
    assert (error.status, error.code, error.retryable, error.attempts) == (status, code, False, 1)
    assert error.message_id
    assert str(status) in str(error)
    assert calls == ["/v1/events/track"]
    assert sleeps.delays == []
    assert reports == []  # the caller got the exception; nothing goes to on_error
    assert API_KEY not in str(error)
    assert (client.stats().sent, client.stats().send_failed) == (0, 1)


async def test_an_unsafe_error_code_is_left_out() -> None:
    body = {"error": {"code": "<script>" + "x" * 100, "message": "no"}}
    transport = httpx.MockTransport(lambda r: httpx.Response(400, json=body))
    async with whisperr.AsyncClient(api_key=API_KEY, transport=transport) as client:
        with pytest.raises(whisperr.SendError) as info:
            await client.send("user_1", "payment_failed")
    assert info.value.code is None
    assert "<script>" not in str(info.value)


async def test_a_redirect_is_not_followed_with_the_key() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"location": "https://elsewhere.example/steal"})

    async with whisperr.AsyncClient(
        api_key=API_KEY, transport=httpx.MockTransport(answer)
    ) as client:
        with pytest.raises(whisperr.SendError) as info:
            await client.send("user_1", "payment_failed")
    assert calls == ["https://api.whisperr.net/v1/events/track"]
    assert (info.value.status, info.value.retryable) == (307, False)


async def test_a_hanging_server_ends_the_send_within_its_timeout(server: LocalServer) -> None:
    server.app.faults.mix({Fault.hang(): 1.0})
    async with client_for(server.url, shutdown_timeout=1) as client:
        started = time.monotonic()
        with pytest.raises(whisperr.SendError) as info:
            await client.send("user_1", "payment_failed", timeout=1)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0  # the timeout, plus a round trip and a busy machine's slack
    assert info.value.retryable
    assert "timed out" in str(info.value)


async def test_retries_stop_when_the_next_would_not_fit(sleeps: Sleeps) -> None:
    """Retry-After: 30 with timeout=5: one attempt, no 30 s wait, a retryable error."""
    transport = httpx.MockTransport(
        lambda r: httpx.Response(429, headers={"retry-after": "30"}, json={})
    )
    async with whisperr.AsyncClient(api_key=API_KEY, transport=transport, sleep=sleeps) as c:
        with pytest.raises(whisperr.SendError) as info:
            await c.send("user_1", "payment_failed", timeout=5)
    assert (info.value.attempts, info.value.retryable, info.value.status) == (1, True, 429)
    assert sleeps.delays == []


# -- concurrency, threads, lifecycle ----------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_200_concurrent_sends(server: LocalServer, anyio_backend: str) -> None:
    receipts: list[whisperr.Receipt] = []
    async with client_for(server.url) as client:

        async def one(i: int) -> None:
            receipts.append(await client.send(f"user_{i}", "payment_failed", {"i": i}))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
        stats = client.stats()
    assert len({r.message_id for r in receipts}) == 200
    assert server.app.stored_ids() == {r.message_id for r in receipts}
    assert (stats.sent, stats.send_failed, stats.sending, stats.tracked) == (200, 0, 0, 0)


def test_sends_from_8_threads_through_the_sync_client(server: LocalServer) -> None:
    receipts: list[whisperr.Receipt] = []
    errors: list[BaseException] = []
    with whisperr.Client(api_key=API_KEY, base_url=server.url) as client:

        def work(thread: int) -> None:
            try:
                for i in range(10):
                    receipts.append(client.send(f"user_{thread}", "payment_failed", {"i": i}))
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert server.app.sent_ids() == {r.message_id for r in receipts}
    assert len(receipts) == 80


async def test_flush_does_not_wait_for_sends_and_aclose_does(server: LocalServer) -> None:
    """A send never moves the flush barrier; aclose lets it land within its own timeout."""
    server.app.faults.script([Fault.delay(2.0)])  # long enough to outlast the flush below
    http, started = started_hook()
    async with http, client_for(server.url, http_client=http) as client:
        client.track("user_1", "queued_one")
        async with anyio.create_task_group() as tg:
            results: list[whisperr.Receipt] = []

            async def send() -> None:
                results.append(await client.send("user_2", "sent_now"))

            tg.start_soon(send)
            with anyio.fail_after(5):
                await started.wait()
            flushed = await client.flush(timeout=5)
            assert (flushed.delivered, flushed.pending) == (1, 0)
            assert client.stats().sending == 1  # still under way: flush did not wait for it
            closed = await client.aclose(timeout=5)
    assert not closed.timed_out
    assert len(results) == 1
    stats = client.stats()
    assert (stats.tracked, stats.delivered, stats.dropped, stats.sent) == (1, 1, 0, 1)
    assert len(server.app.events) == 2


async def test_a_close_that_runs_out_of_time_fails_the_send_retryable(server: LocalServer) -> None:
    server.app.faults.mix({Fault.hang(): 1.0})
    http, started = started_hook()
    client = client_for(server.url, http_client=http)
    errors: list[whisperr.SendError] = []

    async def send() -> None:
        try:
            await client.send("user_1", "payment_failed", timeout=30)
        except whisperr.SendError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await started.wait()
            closed = await client.aclose(timeout=0.3)
    await http.aclose()
    assert closed.timed_out
    assert len(errors) == 1
    assert errors[0].retryable
    assert client.stats().send_failed == 1
    with pytest.raises(whisperr.ClientClosedError):
        await client.send("user_1", "payment_failed")


async def test_disabled_validates_and_marks_the_receipt_not_sent() -> None:
    async with whisperr.AsyncClient(disabled=True) as client:
        receipt = await client.send("user_1", "payment_failed", message_id="outbox-17")
        with pytest.raises(whisperr.InvalidEventError, match="event_type"):
            await client.send("user_1", "Payment Failed")
    assert (receipt.sent, receipt.status, receipt.message_id) == (False, None, "outbox-17")


async def test_invalid_input_raises_even_when_not_strict(server: LocalServer) -> None:
    async with client_for(server.url, strict=False) as client:
        with pytest.raises(whisperr.InvalidEventError, match="external_user_id"):
            await client.send("", "payment_failed")
        with pytest.raises(whisperr.InvalidEventError, match="properties"):
            await client.send("user_1", "payment_failed", {"x": object()})
    assert track_requests(server) == []
    assert client.stats().dropped == 0  # not queued, so not a drop either


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_identify_now(server: LocalServer, anyio_backend: str) -> None:
    async with client_for(server.url) as client:
        receipt = await client.identify_now("user_1", {"plan": "pro"}, email="a@example.com")
    assert (receipt.sent, receipt.status, receipt.message_id) == (True, 200, "")
    assert server.app.identifies[0]["external_user_id"] == "user_1"


async def test_the_module_level_send(server: LocalServer) -> None:
    whisperr.init(API_KEY, base_url=server.url)
    try:
        receipt = await whisperr.send("user_1", "payment_failed")
        assert (await whisperr.identify_now("user_1")).status == 200
    finally:
        await whisperr.shutdown()
    assert server.app.sent_ids() == {receipt.message_id}


async def test_an_async_hook_may_send_and_a_blocking_send_on_the_delivery_thread_raises(
    server: LocalServer,
) -> None:
    server.app.faults.script([Fault.status(400)])
    sent: list[whisperr.Receipt] = []

    async def hook(report: whisperr.DeliveryReport) -> None:
        sent.append(await client.send("ops", "delivery_dropped", {"count": report.count}))

    client = client_for(server.url, on_error=hook)
    client.track("user_1", "payment_failed")
    await client.aclose(timeout=5)
    assert [r.status for r in sent] == [202]

    failures: list[BaseException] = []

    def blocking_hook(report: whisperr.DeliveryReport) -> None:
        try:
            sync.send("ops", "delivery_dropped")
        except whisperr.SendError as exc:
            failures.append(exc)

    server.app.faults.script([Fault.status(400)])
    sync = whisperr.Client(api_key=API_KEY, base_url=server.url, on_error=blocking_hook)
    sync.track("user_1", "payment_failed")
    await anyio.to_thread.run_sync(sync.close, 5)
    assert len(failures) == 1
    assert "delivery thread" in str(failures[0])
    # Refused before it was handed over: not sent behind its caller's back, counted failed.
    assert [e["event_type"] for e in server.app.events] == ["delivery_dropped"]  # the async one
    assert (sync.stats().sent, sync.stats().send_failed) == (0, 1)


async def test_an_async_hook_sends_from_the_final_reports_of_a_close(server: LocalServer) -> None:
    """aclose() runs out of time with a batch in flight: its "shutdown" report reaches an async
    hook, whose alert (a send) still lands within the hooks' final budget."""
    server.app.faults.script([Fault.delay(3.0)])
    sent: list[whisperr.Receipt] = []

    async def hook(report: whisperr.DeliveryReport) -> None:
        if report.type == "dropped":
            sent.append(await client.send("ops", "events_lost", {"count": report.count}))

    client = client_for(server.url, on_error=hook)
    client.track("user_1", "payment_failed")
    closed = await client.aclose(timeout=1)
    assert closed.timed_out
    assert [r.status for r in sent] == [202]
    assert server.app.sent_ids() == {sent[0].message_id}
    assert (client.stats().sent, client.stats().send_failed) == (1, 0)


def test_a_send_from_another_thread_starts_while_an_identify_is_delivered(
    server: LocalServer,
) -> None:
    """An identify goes alone and is awaited by the serve loop; a send handed in from another
    thread meanwhile starts at once, not after it (here the identify hangs)."""
    with whisperr.Client(api_key=API_KEY, base_url=server.url, flush_interval=0.01) as client:
        client.send("user_0", "warm_up")
        server.app.faults.script([Fault.hang()])
        client.identify("user_1", {"plan": "pro"})
        deadline = time.monotonic() + 10
        while not any(r.fault == Fault.hang() for r in server.app.requests):  # bounded poll
            assert time.monotonic() < deadline, "the identify never reached the server"
            time.sleep(0.01)
        started = time.monotonic()
        receipt = client.send("user_1", "sent_meanwhile", timeout=5)
        elapsed = time.monotonic() - started
        client.close(timeout=0.5)
    assert receipt.status == 202
    assert elapsed < 2.0  # one round trip; without the fix it waited the whole 5 s and failed


def test_the_capture_kit_asserts_sends() -> None:
    capture = Capture()

    async def main() -> None:
        async with capture.client() as client:
            client.track("user_1", "queued_one")
            await client.send("user_2", "sent_now", {"k": 1})

    anyio.run(main)
    capture.assert_sent("sent_now", user="user_2", properties={"k": 1}, count=1)
    capture.assert_tracked("sent_now")  # a send is tracked too
    with pytest.raises(AssertionError, match="sent"):
        capture.assert_sent("queued_one")


def test_a_fork_child_sends(server: LocalServer, tmp_path: Any) -> None:
    """A forked child's client starts clean and sends from there (a real process)."""
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no fork here")
    script = tmp_path / "fork_send.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, whisperr
            client = whisperr.Client(api_key={API_KEY!r}, base_url={server.url!r})
            client.send("parent", "before_fork")
            pid = os.fork()
            if pid == 0:
                receipt = client.send("child", "in_child")
                os._exit(0 if receipt.status == 202 else 1)
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    users = sorted(e["external_user_id"] for e in server.app.events)
    assert users == ["child", "parent"]


async def test_no_warning_or_report_for_a_send_the_caller_awaits(
    caplog: pytest.LogCaptureFixture, sleeps: Sleeps
) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(503))
    with caplog.at_level(logging.DEBUG, logger="whisperr"):
        async with whisperr.AsyncClient(api_key=API_KEY, transport=transport, sleep=sleeps) as c:
            with pytest.raises(whisperr.SendError) as info:
                await c.send("user_1", "payment_failed", timeout=1)
    assert info.value.retryable
    assert info.value.attempts >= 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert c.stats().last_error is None
