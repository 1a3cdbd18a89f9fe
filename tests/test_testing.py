"""The testing kit, used as a user would in their own test suite."""

from __future__ import annotations

import pytest

import whisperr
from whisperr.testing import Capture, FixedClock

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
