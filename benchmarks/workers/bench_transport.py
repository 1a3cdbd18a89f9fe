"""Worker for benchmarks/transport.py: CPU per request through this SDK's own request function.

Started with ``PYTHONPATH`` at the version measured (the work tree, or a git ref extracted by
transport.py), so ``whisperr`` here may be an older commit: only what both the current and
the previous main have is used, ``Delivery(settings, ledger).open()`` (the pool the runner
makes) and ``whisperr._transport.post(client, url, headers, body, timeout, clock)``.

The spec holds ``url`` (the server's base URL), ``requests`` (timed), ``warmup`` (sent before the
timing; the first one connects) and ``transport``: ``"default"`` (the version's own default) or
``"httpx"`` (``transport=httpx.AsyncHTTPTransport()``, as a user would pass it). It prints one
``RESULT`` line: process CPU µs per request (``time.process_time``, so the server, in its own
process, is not counted), wall µs per request, and ms to make the transport and its client.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _common
import httpx
import orjson

import whisperr
from whisperr._config import Settings
from whisperr._delivery import Delivery
from whisperr._ledger import Ledger
from whisperr._transport import post, request_headers

DISTINCT_BODIES = 20  # cycled, so that the work outside the loop does not grow with `requests`


def bodies(count: int) -> list[bytes]:
    """500-event batch bodies of about 124 kB, as the SDK sends them."""

    def event(batch: int, i: int) -> dict[str, object]:
        return {
            "external_user_id": f"user_{i:05d}",
            "event_type": "payment_failed",
            "occurred_at": "2026-11-30T12:00:00.000Z",
            "properties": {"amount_cents": 1999, "plan": "pro", "attempt": i},
            "context": {
                "$message_id": f"{batch:08x}-0000-4000-8000-{i:012x}",
                "sdk_name": "bench",
                "sdk_version": "0",
            },
        }

    return [orjson.dumps({"events": [event(b, i) for i in range(500)]}) for b in range(count)]


async def main(s: dict[str, Any]) -> dict[str, Any]:
    payloads = bodies(DISTINCT_BODIES)
    url = httpx.URL(s["url"] + "/v1/events/batch")
    headers = request_headers("wrk_bench")
    started = time.perf_counter()
    transport = httpx.AsyncHTTPTransport() if s["transport"] == "httpx" else None
    delivery = Delivery(
        Settings(api_key="wrk_bench", base_url=s["url"], transport=transport), Ledger(None)
    )
    client = delivery.open()
    # the default transport is called directly since 0d3c5d9; the others sit in an httpx client
    used = client._transport if isinstance(client, httpx.AsyncClient) else client
    made_ms = (time.perf_counter() - started) * 1e3

    async def send(i: int) -> None:
        outcome = await post(client, url, headers, payloads[i % DISTINCT_BODIES], 10.0, time.time)
        if outcome.kind != "ok":
            raise SystemExit(f"request {i}: {outcome.kind} {outcome.message}")

    try:
        for i in range(s["warmup"]):
            await send(i)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(s["requests"]):
            await send(i)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await delivery.close(client)
    n = s["requests"]
    return {
        "file": whisperr.__file__,
        "transport": type(used).__module__ + "." + type(used).__name__,
        "cpu_us": cpu / n * 1e6,
        "wall_us": wall / n * 1e6,
        "made_ms": made_ms,
        "body_bytes": len(payloads[0]),
    }


if __name__ == "__main__":
    _common.quiet_loggers("whisperr", "httpx", "httpcore")
    _common.finish(asyncio.run(main(_common.spec())))
