"""End to end over real sockets: the client against the bundled server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

import whisperr
from whisperr.server import LocalServer, create_app

from .conftest import API_KEY

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


async def test_100k_events_accepted_exactly_once(server: LocalServer) -> None:
    """100,000 track() calls then aclose(): all stored once, no batch above 500, none rejected."""
    client = whisperr.AsyncClient(api_key=API_KEY, base_url=server.url)
    sent = set()
    for i in range(100_000):
        sent.add(client.track(f"user_{i % 997}", "payment_failed", {"i": i}))
        if i % 1000 == 0:
            await anyio.lowlevel.checkpoint()  # a service yields to its loop between requests
    result = await client.aclose(timeout=60)
    stored = [e["context"]["$message_id"] for e in server.app.events]
    assert len(stored) == len(set(stored)) == 100_000
    assert set(stored) == sent
    batches = [r for r in server.app.requests if r.path == "/v1/events/batch"]
    assert max(r.events for r in batches) <= 500
    assert {r.status for r in server.app.requests} == {202}
    assert (result.dropped, result.pending, result.timed_out) == (0, 0, False)
    stats = client.stats()
    assert stats.tracked == stats.delivered == 100_000


async def test_identify_and_track_over_sockets(server: LocalServer) -> None:
    """Identify and track reach the server in order, validated by it."""
    async with whisperr.AsyncClient(api_key=API_KEY, base_url=server.url) as client:
        client.track("user_1", "trial_started")
        client.identify("user_1", {"plan": "pro"}, email="ada@example.com")
        client.track("user_1", "plan_upgraded", {"plan": "pro"})
    assert [r.path for r in server.app.requests] == [
        "/v1/events/batch",
        "/v1/identify",
        "/v1/events/batch",
    ]
    assert server.app.identifies[0]["channels"][0]["channel"] == "email"
    assert [e["event_type"] for e in server.app.events] == ["trial_started", "plan_upgraded"]


async def test_wrong_key_is_kept_then_reported_at_close(server: LocalServer) -> None:
    """A rejected key keeps events queued; closing reports them as unauthorized."""
    reports: list[whisperr.DeliveryReport] = []
    client = whisperr.AsyncClient(api_key="wrk_wrong", base_url=server.url, on_error=reports.append)
    client.track("u", "a_b")
    assert (await client.flush(timeout=5)).pending == 1
    await client.aclose(timeout=5)
    assert client.stats().dropped_by_reason == {"unauthorized": 1}
    assert reports[0].type == "auth"
    assert server.app.events == []
