"""Type-checked (never run): every public signature used as a user would."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import httpx

import whisperr


async def use_client() -> None:
    settings = whisperr.Settings.from_env(api_key="wrk_x", flush_interval=0.5)
    reports: list[whisperr.DeliveryReport] = []
    async with whisperr.AsyncClient(settings, on_error=reports.append) as client:
        message_id: str = client.track("u", "payment_failed", {"amount_cents": 1}, {"ip": "x"})
        client.track("u", "a_b", occurred_at="2026-01-01T00:00:00Z", message_id=message_id)
        client.identify("u", {"plan": "pro"}, email="a@b.c", preferred_channel="email")
        result: whisperr.FlushResult = await client.flush(timeout=1.0)
        stats: whisperr.Stats = client.stats()
        print(result.delivered, stats.dropped_by_reason, stats.last_error)
    await whisperr.AsyncClient(
        api_key="wrk_x", transport=httpx.MockTransport(lambda r: httpx.Response(202))
    ).aclose()


async def use_typed_settings_keywords(http: httpx.AsyncClient) -> None:
    def drop_emails(event: dict[str, Any]) -> dict[str, Any] | None:
        return None if "email" in event["properties"] else event

    await whisperr.AsyncClient("wrk_x").aclose()  # the key, positionally
    await whisperr.AsyncClient(
        "wrk_x",
        base_url="https://gw.example.com/whisperr",
        app_version=None,
        max_batch_size=100,
        flush_at=None,
        flush_interval=1,  # an int is a float to a type checker too
        overflow="drop_newest",
        max_retries=3,
        backoff_cap=2.5,
        on_error=hook,
        before_send=drop_emails,
        pii="drop_fields",
        metrics=True,
        strict=False,
        verify=ssl.create_default_context(),
        http_client=http,
        clock=time.monotonic,
        sleep=asyncio.sleep,
    ).aclose()
    settings = whisperr.Settings(api_key="wrk_x", disabled=True, proxy="http://127.0.0.1:3128")
    await whisperr.AsyncClient(settings, request_timeout=5.0, verify=False).aclose()
    whisperr.Client(settings, shutdown_timeout=0, trust_env=False).close()
    # Each keyword is checked (strict mypy reports an unused ignore: these prove the errors).
    whisperr.AsyncClient(flush_intervall=1)  # type: ignore[call-arg]
    whisperr.AsyncClient(flush_interval="1")  # type: ignore[arg-type]
    whisperr.AsyncClient("wrk_x", overflow="block")  # type: ignore[arg-type]
    whisperr.Client(max_batch_size=1.5)  # type: ignore[arg-type]
    whisperr.Settings(flush_intervall=1)  # type: ignore[call-arg]
    whisperr.Settings.from_env({}, max_retries="3")  # type: ignore[arg-type]


async def hook(report: whisperr.DeliveryReport) -> None:
    print(report.type, report.reason, report.count, report.message_ids)


async def use_module() -> None:
    whisperr.init("wrk_x", on_error=hook)
    whisperr.init(flush_intervall=1)  # type: ignore[call-arg]
    whisperr.init("wrk_x", flush_interval="1")  # type: ignore[arg-type]
    whisperr.track("u", "a_b")
    whisperr.identify("u")
    flushed: whisperr.FlushResult = await whisperr.flush()
    closed: whisperr.FlushResult | None = await whisperr.shutdown()
    print(flushed, closed)


def use_sync_client() -> None:
    with whisperr.Client(api_key="wrk_x", max_concurrency=2) as client:
        message_id: str = client.track("u", "job_done", {"id": 1})

        @whisperr.flush_after(client, timeout=1.0)
        def handler(job: int) -> int:
            client.identify("u", phone="+15551234567")
            return job

        done: int = handler(3)
        flushed: whisperr.FlushResult = client.flush(timeout=1)
        stats: whisperr.Stats = client.stats()
        print(message_id, done, flushed.pending, stats.batches_in_flight)


async def use_testing_kit() -> None:
    from whisperr.testing import Capture, FixedClock, TrackedEvent

    capture = Capture(clock=FixedClock(0.0))
    async with capture.client() as client:
        client.track("u", "a_b")
    event: TrackedEvent = capture.assert_tracked("a_b", user="u", count=1)
    print(event.message_id, capture.events, capture.identifies)
