"""The testing kit, used as a user would in their own test suite."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import whisperr
from whisperr.testing import Capture, FixedClock

from .conftest import Api

pytestmark = pytest.mark.anyio


async def checkout(client: whisperr.AsyncClient, user: str, declined: bool) -> None:
    """Stand-in for application code under test."""
    if declined:
        client.track(user, "payment_failed", {"amount_cents": 4900, "reason": "card_declined"})
    else:
        client.track(user, "payment_succeeded", {"amount_cents": 4900})


async def test_assert_tracked_through_the_real_client() -> None:
    """A capture receives what the code tracked, through batching and the local server."""
    capture = Capture()
    async with capture.client() as client:
        await checkout(client, "user_8842", declined=True)
        await client.flush()
    event = capture.assert_tracked(
        "payment_failed", user="user_8842", properties={"amount_cents": 4900}
    )
    assert event.properties["reason"] == "card_declined"
    assert event.occurred_at == "2026-01-01T00:00:00.000Z"
    assert event.context["sdk_name"] == "whisperr-python-async"


async def test_assert_tracked_fails_with_a_listing() -> None:
    """A missing event fails with a message that lists what was tracked instead."""
    capture = Capture()
    async with capture.client() as client:
        await checkout(client, "user_1", declined=False)
    with pytest.raises(
        AssertionError, match=r"expected 'payment_failed'.*\n  user_1 payment_succeeded"
    ):
        capture.assert_tracked("payment_failed")
    with pytest.raises(AssertionError, match="2 time"):
        capture.assert_tracked("payment_succeeded", count=2)
    capture.assert_tracked("payment_succeeded", count=1)


async def test_fixed_clock_stamps_events() -> None:
    """The fixed clock decides occurred_at; advancing it moves later events."""
    clock = FixedClock(1_781_438_400.5)
    capture = Capture(clock=clock)
    async with capture.client() as client:
        client.track("u", "first")
        clock.advance(61)
        client.track("u", "second")
    assert [e.occurred_at for e in capture.events] == [
        "2026-06-14T12:00:00.500Z",
        "2026-06-14T12:01:01.500Z",
    ]


async def test_capture_sees_invalid_wire_data_as_the_api_would() -> None:
    """Nothing invalid can be captured: the client refuses it at the call site."""
    capture = Capture()
    async with capture.client() as client:
        with pytest.raises(whisperr.InvalidEventError):
            client.track("u", "NotSnake")
    capture.assert_nothing_tracked()


async def test_fixture_captures_the_module_level_api(whisperr_capture: Capture) -> None:
    """The pytest fixture installs the capture as the module-level client."""
    whisperr.track("user_8842", "plan_upgraded", {"plan": "pro"})
    whisperr.identify("user_8842", {"plan": "pro"})
    await whisperr.flush()
    whisperr_capture.assert_tracked("plan_upgraded", user="user_8842", properties={"plan": "pro"})
    assert whisperr_capture.identifies == [
        {"external_user_id": "user_8842", "traits": {"plan": "pro"}}
    ]


def test_sync_client_capture() -> None:
    """A sync Client from the capture works in plain test functions."""
    capture = Capture()
    with capture.sync_client() as client:
        client.track("u", "job_done", {"id": 7})
    capture.assert_tracked("job_done", properties={"id": 7})


def test_fixture_in_a_plain_test_needs_no_flush(whisperr_capture: Capture) -> None:
    """In a plain test, reading the capture first waits for delivery: no asyncio call."""
    whisperr.track("user_8842", "plan_upgraded", {"plan": "pro"})
    whisperr.identify("user_8842", {"plan": "pro"})
    whisperr_capture.assert_tracked("plan_upgraded", user="user_8842", count=1)
    assert whisperr_capture.identifies == [
        {"external_user_id": "user_8842", "traits": {"plan": "pro"}}
    ]


def test_assert_nothing_tracked_sees_what_is_not_delivered_yet(whisperr_capture: Capture) -> None:
    """assert_nothing_tracked() does not pass just because delivery had not happened yet."""
    whisperr.track("user_1", "export_requested")
    with pytest.raises(AssertionError, match=r"received 1:\n  user_1 export_requested"):
        whisperr_capture.assert_nothing_tracked()


def test_tracks_from_worker_threads_are_captured(whisperr_capture: Capture) -> None:
    """Code under test tracking from other threads (a WSGI server's, a thread pool) is read too."""

    def handle(n: int) -> None:
        for i in range(50):
            whisperr.track(f"user_{n}", "page_viewed", {"i": i})

    threads = [threading.Thread(target=handle, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(4):
        whisperr_capture.assert_tracked("page_viewed", user=f"user_{n}", count=50)


async def test_init_and_shutdown_keep_the_capture(
    whisperr_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's own init() (with real-looking settings) and shutdown() keep the capture's client
    installed and open; nothing is sent anywhere else."""
    installed = whisperr.get_client()
    with caplog.at_level(logging.DEBUG, logger="whisperr"):
        client = whisperr.init(api_key="wrk_live_0123456789", base_url="https://api.example.com")
    assert client is installed
    assert client.settings.api_key == "wrk_test_capture"
    assert "test capture" in caplog.text
    whisperr.track("user_1", "signed_up")
    result = await whisperr.shutdown()
    assert result is not None
    assert result.pending == 0
    assert whisperr.get_client() is installed
    assert whisperr.init() is installed  # the lifespan of a second app in the same test
    whisperr.track("user_1", "logged_in")  # still open
    assert [e.event_type for e in whisperr_capture.events] == ["signed_up", "logged_in"]


async def test_installed_sets_a_default_client_aside(settings: dict[str, Any], api: Api) -> None:
    """A client of whisperr.init() made before the capture (at import, say) is set aside and put
    back afterwards, untouched; the capture's client is closed, what it held delivered."""
    original = whisperr.init(**settings)
    try:
        capture = Capture()
        with capture.installed() as client:
            assert whisperr.get_client() is client
            whisperr.track("user_1", "payment_failed")
        assert whisperr.get_client() is original
        with pytest.raises(whisperr.ClientClosedError):
            client.track("user_1", "payment_failed")
        capture.assert_tracked("payment_failed", user="user_1", count=1)
        whisperr.track("user_2", "after_the_test")
        await whisperr.flush()
        assert [(e["external_user_id"], e["event_type"]) for e in api.events] == [
            ("user_2", "after_the_test")
        ]
    finally:
        await whisperr.shutdown()
    with pytest.raises(whisperr.WhisperrError, match=r"whisperr\.init"):
        whisperr.get_client()


async def test_a_client_delivering_in_this_loop_is_not_waited_for() -> None:
    """Reading cannot wait for a client served by the calling thread's own loop: the failure
    says so; after ``await client.flush()`` the event is there."""
    capture = Capture()
    async with capture.client() as client:
        client.track("u", "a_b")
        with pytest.raises(AssertionError, match=r"1 tracked but not delivered yet"):
            capture.assert_tracked("a_b")
        await client.flush()
        capture.assert_tracked("a_b", count=1)


def test_an_open_sync_client_is_delivered_before_reading() -> None:
    """A sync Client of the capture, still open: reading waits for its delivery thread."""
    capture = Capture()
    client = capture.sync_client()
    try:
        client.track("u", "job_done", {"id": 7})
        capture.assert_tracked("job_done", properties={"id": 7}, count=1)
    finally:
        client.close()


def test_capture_ignores_whisperr_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """WHISPERR_* variables set for the test run (disabled, a base URL) do not reach the
    capture's clients."""
    monkeypatch.setenv("WHISPERR_DISABLED", "true")
    monkeypatch.setenv("WHISPERR_BASE_URL", "http://127.0.0.1:9")
    capture = Capture()
    with capture.sync_client() as client:
        assert not client.settings.disabled
        client.track("u", "job_done")
    capture.assert_tracked("job_done", count=1)
