"""The client's OpenTelemetry metrics, read with the OpenTelemetry SDK's in-memory reader.

Each count must equal stats() at the moment it is read, during a delivery with faults; the
histograms count one sample a request and one a delivered batch.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

import whisperr

from .conftest import NOW, Api, Clock

otel_sdk = pytest.importorskip("opentelemetry.sdk.metrics", reason="the test group has it")
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def read(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every data point of the whisperr meter, by instrument name."""
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "whisperr"
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    return points


def value(points: dict[str, list[Any]], name: str, **attributes: str) -> int:
    found = [p.value for p in points[name] if dict(p.attributes or {}) == attributes]
    assert len(found) == 1, f"{name} {attributes}: {points[name]}"
    return int(found[0])


def assert_counts_equal_stats(points: dict[str, list[Any]], stats: whisperr.Stats) -> None:
    assert value(points, "whisperr.events.tracked") == stats.tracked
    assert value(points, "whisperr.identifies") == stats.identified
    assert value(points, "whisperr.events.delivered") == stats.delivered
    assert value(points, "whisperr.events.retried") == stats.retried
    dropped = {dict(p.attributes)["reason"]: p.value for p in points["whisperr.events.dropped"]}
    assert dropped == dict(stats.dropped_by_reason)
    assert value(points, "whisperr.queue.events") == stats.queued
    assert value(points, "whisperr.queue.size") == stats.queued_bytes
    assert value(points, "whisperr.events.in_flight") == stats.in_flight
    assert value(points, "whisperr.sends", outcome="sent") == stats.sent
    assert value(points, "whisperr.sends", outcome="failed") == stats.send_failed


async def test_metrics_equal_stats_through_faults(
    settings: dict[str, Any],
    api: Api,
    clock: Clock,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    def internal(event: dict[str, Any]) -> dict[str, Any] | None:
        return None if event["external_user_id"] == "staff" else event

    api.script = [
        httpx.Response(503),  # the first batch is retried once
        httpx.Response(202, json={"accepted": 3, "rejected": 0}),
        httpx.Response(400, json={"error": {"code": "invalid_request"}}),  # the second dropped
    ]
    client = whisperr.AsyncClient(
        **settings, meter_provider=provider, strict=False, before_send=internal, max_batch_size=3
    )
    for i in range(3):
        client.track(f"user_{i}", "payment_failed")
    client.track("staff", "payment_failed")  # filtered
    client.track("user_x", "Not Valid")  # invalid, strict=False
    client.identify("", {"plan": "pro"})  # invalid too: an identify refused
    points = read(reader)
    assert_counts_equal_stats(points, client.stats())
    assert value(points, "whisperr.queue.events") == 3

    clock.now = NOW + 2.0  # acknowledged two seconds after capture
    await client.flush()
    for i in range(3):
        client.track(f"user_{i}", "payment_failed")
    await client.flush()
    receipt = await client.send("user_1", "payment_failed")
    assert receipt.sent
    await client.aclose()

    stats = client.stats()
    assert (stats.delivered, stats.retried, stats.sent) == (3, 3, 1)
    assert dict(stats.dropped_by_reason) == {"filtered": 1, "invalid": 2, "rejected": 3}
    assert (stats.tracked, stats.identified) == (8, 1)
    points = read(reader)
    assert_counts_equal_stats(points, stats)

    requests = {
        (p.attributes["endpoint"], p.attributes["outcome"]): p.count
        for p in points["whisperr.request.duration"]
    }
    assert requests == {
        ("batch", "retry"): 1,
        ("batch", "ok"): 1,
        ("batch", "drop"): 1,
        ("track", "ok"): 1,
    }
    assert sum(requests.values()) == len(api.requests)
    (delay,) = points["whisperr.delivery.delay"]
    assert delay.count == 1  # one delivered batch
    assert delay.sum == pytest.approx(2.0, abs=0.001)  # stamps are kept to the millisecond
    assert (stats.delivery_delay_p50, stats.delivery_delay_p99) == (
        pytest.approx(2.0, abs=0.001),
    ) * 2


async def test_metrics_true_uses_the_global_provider(
    settings: dict[str, Any],
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import metrics

    monkeypatch.setattr(metrics, "get_meter_provider", lambda: provider)
    async with whisperr.AsyncClient(**settings, metrics=True) as client:
        client.track("user_1", "payment_failed")
    assert value(read(reader), "whisperr.events.delivered") == 1


def test_metrics_off_by_default_register_nothing(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # importing it would fail
    client = whisperr.AsyncClient(**settings)
    client.track("user_1", "payment_failed")
    assert client.stats().tracked == 1


def test_metrics_without_the_api_is_a_config_error(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(whisperr.ConfigError, match=r"whisperr-async\[otel\]"):
        whisperr.AsyncClient(**settings, metrics=True)


def test_metrics_from_the_environment(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WHISPERR_METRICS", "true")
    assert whisperr.Settings(api_key="k").metrics_on
    monkeypatch.setenv("WHISPERR_METRICS", "0")
    assert not whisperr.Settings(api_key="k").metrics_on


async def test_delivery_delay_percentiles_of_recent_events(
    settings: dict[str, Any], clock: Clock
) -> None:
    client = whisperr.AsyncClient(**settings)
    assert client.stats().delivery_delay_p50 is None
    for i in range(100):
        when = datetime.fromtimestamp(NOW - i, timezone.utc)  # 0 to 99 s old
        client.track("user_1", "payment_failed", occurred_at=when)
    await client.aclose()
    stats = client.stats()
    assert stats.delivery_delay_p50 == pytest.approx(49.0, abs=0.01)
    assert stats.delivery_delay_p99 == pytest.approx(98.0, abs=0.01)


async def test_identifies_are_counted_once_taken(settings: dict[str, Any]) -> None:
    disabled = whisperr.AsyncClient(**settings, disabled=True)
    disabled.identify("user_1", {"plan": "pro"})
    disabled.track("user_1", "payment_failed")
    assert (disabled.stats().tracked, disabled.stats().identified) == (0, 0)
    client = whisperr.AsyncClient(**settings)
    client.track("user_1", "payment_failed")
    await client.aclose()
    with pytest.raises(whisperr.ClientClosedError):
        client.identify("user_1", {"plan": "pro"})
    stats = client.stats()
    assert (stats.tracked, stats.identified, stats.delivered) == (1, 0, 1)


async def test_a_clock_of_whole_seconds_is_timed_too(settings: dict[str, Any]) -> None:
    settings["clock"] = lambda: 1_781_438_400  # an int: time.time() rounded, as a test may pass
    client = whisperr.AsyncClient(**settings)
    when = datetime.fromtimestamp(1_781_438_400 - 60, timezone.utc)
    client.track("user_1", "payment_failed", occurred_at=when)
    client.track("user_1", "payment_failed")
    await client.aclose()
    stats = client.stats()
    assert (stats.delivered, stats.delivery_delay_p50, stats.delivery_delay_p99) == (2, 0.0, 60.0)


async def test_clients_on_one_provider_add_up_and_a_collected_one_still_counts(
    settings: dict[str, Any], provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    first = whisperr.AsyncClient(**settings, meter_provider=provider)
    second = whisperr.AsyncClient(**settings, meter_provider=provider)
    for _ in range(3):
        first.track("user_1", "payment_failed")
    for _ in range(5):
        second.track("user_2", "payment_failed")
    assert value(read(reader), "whisperr.events.tracked") == 8
    await first.aclose()
    alive = weakref.ref(first)
    del first
    gc.collect()
    assert alive() is None, "the metrics do not keep a client alive"
    points = read(reader)
    assert value(points, "whisperr.events.tracked") == 8  # a counter never goes down
    assert value(points, "whisperr.events.delivered") == 3
    assert value(points, "whisperr.queue.events") == 5  # the second's queue alone
    await second.aclose()


def test_a_meter_provider_that_is_none_of_that_is_a_config_error(
    settings: dict[str, Any],
) -> None:
    with pytest.raises(whisperr.ConfigError, match="meter_provider must be"):
        whisperr.AsyncClient(**settings, meter_provider="prometheus")
