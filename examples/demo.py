"""The whisperr demo: a web service tracking churn signals, end to end, on your machine.

    python examples/demo.py [--requests 2000]

It needs no API key and no network; everything listens on 127.0.0.1 and stops at the end:

1. starts the bundled local Whisperr server (``whisperr.server.LocalServer``) in this process,
2. serves the FastAPI example (``examples/fastapi_app.py``) with uvicorn in a background
   thread, its client pointed at the local server through ``WHISPERR_*`` variables,
3. sends the service real HTTP requests with httpx, each of which calls ``track()``
   (half through an ``async def`` route, half through a plain ``def`` one),
4. shuts the service down, which closes its client and delivers what is still queued,
5. prints what the local server stored, one batch of it, the throughput and the client's stats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

# This file's directory is on sys.path when it runs as a script, so the example imports as-is.
from fastapi_app import create_app as create_service

from whisperr.server import LocalServer, create_app

API_KEY = "wrk_demo_local_key"  # the local server accepts this one; nothing is sent elsewhere
CONCURRENCY = 4  # requests in flight at once


@contextlib.contextmanager
def serve_in_background(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its URL, then stop it."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and
    # without it every response waits ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:  # set once the lifespan has opened the whisperr client
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the FastAPI service did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True  # uvicorn stops, then runs the lifespan's shutdown half
        thread.join(30)
        sock.close()


async def send_requests(base_url: str, count: int) -> list[str]:
    """POST `count` requests, CONCURRENCY at a time; return the message ids sent back."""
    message_ids: list[str] = []
    jobs = iter(range(count))

    async def sender(http: httpx.AsyncClient) -> None:
        for i in jobs:
            user = f"/users/user_{i % 100:03d}"
            if i % 2 == 0:  # the async route
                body = {"amount_cents": 990 + i % 5 * 1000, "decline_code": "insufficient_funds"}
                response = await http.post(f"{user}/payment-failed", json=body)
            else:  # the sync route, run in the service's thread pool
                response = await http.post(f"{user}/cancel", params={"reason": "too_expensive"})
            response.raise_for_status()
            message_ids.append(response.json()["message_id"])

    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=10) as http:
        await asyncio.gather(*(sender(http) for _ in range(CONCURRENCY)))
    return message_ids


def show_batch(events: list[dict[str, Any]], size: int, body_bytes: int, shown: int = 3) -> None:
    print(f"\nOne batch as the server got it ({size} events, {body_bytes:,} bytes); first {shown}:")
    for event in events[:shown]:
        properties = json.dumps(event["properties"])
        print(f"  {event['occurred_at']}  {event['external_user_id']}  {event['event_type']}")
        print(f"      properties {properties}  $message_id {event['context']['$message_id']}")
    print("The first one as sent on the wire:")
    print("\n".join("  " + line for line in json.dumps(events[0], indent=2).splitlines()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The whisperr demo, entirely on 127.0.0.1.")
    parser.add_argument("--requests", type=int, default=2000, help="how many (default 2000)")
    count = parser.parse_args(argv).requests

    with LocalServer(create_app(api_key=API_KEY)) as whisperr_server:
        # The service reads its settings from the environment, as it would in production.
        for name in [name for name in os.environ if name.startswith("WHISPERR_")]:
            del os.environ[name]
        os.environ["WHISPERR_API_KEY"] = API_KEY
        os.environ["WHISPERR_BASE_URL"] = whisperr_server.url

        service = create_service()
        with serve_in_background(service) as service_url:
            print(
                f"Local Whisperr server on {whisperr_server.url}; FastAPI service on {service_url}"
            )
            started = time.perf_counter()
            sent = asyncio.run(send_requests(service_url, count))
            answered = time.perf_counter()
        delivered = time.perf_counter()  # the service has shut down: its client closed

        app = whisperr_server.app
        stored = app.events
        batches = [r for r in app.requests if r.path == "/v1/events/batch" and r.status == 202]

    stored_ids = {event["context"]["$message_id"] for event in stored}
    on_the_wire = sum(batch.events for batch in batches)
    missing, duplicates = len(set(sent) - stored_ids), on_the_wire - len(stored)
    took, total = answered - started, delivered - started
    print(f"\nSent {len(sent):,} requests in {took:.2f} s ({len(sent) / took:,.0f} requests/s).")
    print(
        f"Delivered {on_the_wire:,} events in {len(batches)} batch{'es' * (len(batches) != 1)}; "
        f"the local server stored "
        f"{len(stored):,} ({missing} missing, {duplicates} duplicates)."
    )
    print(
        f"Throughput: {len(stored) / total:,.0f} events/s end to end, from the first request to "
        f"the last event stored ({total:.2f} s).\nThe HTTP round trips set that pace: track() "
        "itself only queues, in microseconds."
    )
    if batches:
        show_batch(stored, batches[0].events, batches[0].body_bytes)

    stats = service.state.whisperr.stats()
    print(
        f"\nClient stats: tracked={stats.tracked:,} delivered={stats.delivered:,} "
        f"dropped={stats.dropped} retried={stats.retried} queued={stats.queued}"
    )
    ok = stored_ids == set(sent) and on_the_wire == len(stored) == len(sent) == count
    print("OK: every event arrived exactly once." if ok else "FAILED: see the counts above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
