"""The service under test for ``benchmarks/service.py``: a FastAPI app with one POST route.

Run by service.py as ``python -m uvicorn app:app --app-dir benchmarks/service --loop uvloop
--http httptools ...`` inside the interpreter of the SDK being measured (the official SDK also
imports as ``whisperr``, so each SDK has its own venv). ``SVC_SDK`` picks what the route does:

- ``none``: nothing (the baseline: FastAPI, uvicorn and the route alone);
- ``ours``: ``whisperr.track()`` on the module-level client of this project, opened in the
  lifespan with ``whisperr.init()`` (``WHISPERR_API_KEY``, ``WHISPERR_BASE_URL``), flushed and
  shut down at the end of it, as the README shows for FastAPI;
- ``official``: ``Whisperr(api_key, base_url=...).track()`` of whisperr 0.2.1 (a sender thread);
- ``posthog``: ``AsyncPosthog(key, host=<sink>/_lenient).capture()`` (posthog's asyncio client);
- ``floor``: the least any in-process queue can cost, and no SDK: the properties encoded with
  orjson and a tuple with a ``time.time()`` stamp appended to a deque, which a task empties
  every second; nothing is validated and nothing is sent.

Every call of the SDK in the route is timed with ``time.perf_counter_ns`` (two clock reads and
a list append, about 0.1 µs, against the 100 µs or more a request costs). ``GET /_bench/stats``
returns the number of route calls (counted here, not by the SDK), the percentiles of those
timings, and which SDK module was imported; ``POST /_bench/reset`` clears the timings.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import perf_counter_ns
from typing import Any

from fastapi import FastAPI

SDK = os.environ.get("SVC_SDK", "none")
SINK = os.environ.get("SVC_SINK", "")  # the ingestion sink's base URL
KEY = os.environ.get("WHISPERR_API_KEY", "wrk_bench")
EVENT_TYPE = "payment_failed"

Track = Callable[[str, str, dict[str, Any]], object]

track: Track | None = None  # set in the lifespan; None for SDK=none
module_file = ""
module_version = ""
calls = 0
track_ns: list[int] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global track, module_file, module_version
    if SDK == "ours":
        import whisperr

        whisperr.init()  # WHISPERR_API_KEY and WHISPERR_BASE_URL, from service.py
        track, module_file, module_version = whisperr.track, whisperr.__file__, whisperr.__version__
        yield
        await whisperr.flush(timeout=5)  # deliver what the last requests tracked
        await whisperr.shutdown()
    elif SDK == "official":
        import whisperr

        client = whisperr.Whisperr(KEY, base_url=SINK)
        track, module_file, module_version = client.track, whisperr.__file__, whisperr.__version__
        yield
        client.shutdown()  # a last delivery pass, then joins its sender thread
    elif SDK == "posthog":
        import posthog

        ph = posthog.AsyncPosthog("phc_bench", host=f"{SINK}/_lenient")

        def capture(user_id: str, event_type: str, properties: dict[str, Any]) -> object:
            return ph.capture(event_type, distinct_id=user_id, properties=properties)

        track, module_file = capture, posthog.__file__
        module_version = posthog.VERSION
        yield
        await ph.shutdown()  # flushes the queue, then closes its httpx client
    elif SDK == "floor":
        import asyncio
        import collections
        import time

        import orjson

        queue: collections.deque[tuple[str, str, float, bytes]] = collections.deque()

        def enqueue(user_id: str, event_type: str, properties: dict[str, Any]) -> object:
            queue.append((user_id, event_type, time.time(), orjson.dumps(properties)))
            return None

        async def empty() -> None:
            while True:
                await asyncio.sleep(1)
                queue.clear()

        track, module_file, module_version = enqueue, orjson.__file__, orjson.__version__
        emptying = asyncio.create_task(empty())
        yield
        emptying.cancel()
    elif SDK == "none":
        yield
    else:
        raise RuntimeError(f"SVC_SDK={SDK!r}: expected none, ours, official, posthog or floor")


app = FastAPI(lifespan=lifespan)


@app.post("/payments/{user_id}/failed")
async def payment_failed(user_id: str) -> dict[str, bool]:
    global calls
    calls += 1
    properties = {"amount_cents": 4900, "plan": "pro", "attempt": calls % 5}
    if track is not None:
        start = perf_counter_ns()
        track(user_id, EVENT_TYPE, properties)
        track_ns.append(perf_counter_ns() - start)
    return {"ok": True}


@app.get("/_bench/stats")
async def stats() -> dict[str, Any]:
    ordered = sorted(track_ns)
    return {
        "sdk": SDK,
        "pid": os.getpid(),
        "module_file": module_file,
        "module_version": module_version,
        "calls": calls,
        "track_us": _percentiles(ordered) if ordered else None,
    }


@app.post("/_bench/reset")
async def reset() -> dict[str, bool]:
    track_ns.clear()
    return {"ok": True}


def _percentiles(ordered: list[int]) -> dict[str, float]:
    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {
        "n": len(ordered),
        "p50": at(0.50),
        "p99": at(0.99),
        "p99.9": at(0.999),
        "max": ordered[-1] / 1000,
    }
