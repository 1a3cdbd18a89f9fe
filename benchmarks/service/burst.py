"""The burst drain for ``benchmarks/service.py``: how long the event loop stalls while an SDK
delivers a burst of events tracked in one go.

    python burst.py '{"sdk": "ours", "url": "http://127.0.0.1:PORT", "n": 100000, ...}'

Inside a running event loop (uvloop when it is installed, as in the service), after one warm-up
event has been delivered: a ticker task sleeps ``tick_s`` (0.5 ms) again and again and records
how much later than asked it woke up. Then ``n`` events are tracked in one synchronous loop
(a fresh properties dict each), and the SDK is flushed:

- ours: ``AsyncClient.track()`` n times, then ``await client.flush()``;
- official (whisperr 0.2.1): ``Whisperr.track()`` n times, then its blocking ``flush()`` in a
  worker thread (``asyncio.to_thread``), its sender thread running meanwhile;
- posthog: ``AsyncPosthog.capture()`` n times, then ``await client.flush()``;
- floor, no SDK: a tuple with the properties encoded by orjson appended to a deque n times, then
  a drain that encodes 100 of them into one JSON body a step (about 50 µs) and yields, sending
  nothing, and its last step again until ``FLOOR_S`` (0.5 s, about ours' drain of 100k) have
  passed, so that the floor is sampled as long as a drain; with the garbage collector off
  meanwhile, so the stalls it sees are the host's own (preemption, interrupts): the least any SDK
  draining in the loop could see.

Each queue is made big enough never to drop (``n + 10000``). Reported: the time of the tracking
loop (the ticker cannot run during it: that stall is the caller's own), the drain time (from
the end of the tracking loop until the flush returned), and the longest and the p99 wake-up lag
of the ticks that started after the tracking loop, during the drain: what other requests of the
service would have waited for. What reached the server is counted by service.py, not here.
Prints one line, ``RESULT {json}``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

USER = "user_8842"
EVENT_TYPE = "payment_failed"

FLOOR_S = 0.5
Track = Callable[[str, str, dict[str, Any]], object]
Step = Callable[[], Awaitable[Any]]


async def open_client(sdk: str, url: str, queue: int) -> tuple[Track, Step, Step]:
    """``(track, flush, close)`` for ``sdk``, pointed at the sink at ``url``."""
    if sdk == "ours":
        import whisperr

        client = whisperr.AsyncClient(api_key="wrk_bench", base_url=url, max_queue_size=queue)
        await client.__aenter__()
        return client.track, client.flush, client.aclose
    if sdk == "official":
        import whisperr

        official = whisperr.Whisperr("wrk_bench", base_url=url, max_queue_size=queue)

        async def flush_official() -> None:
            await asyncio.to_thread(official.flush)

        async def close_official() -> None:
            await asyncio.to_thread(official.shutdown)

        return official.track, flush_official, close_official
    if sdk == "posthog":
        import posthog

        ph = posthog.AsyncPosthog("phc_bench", host=f"{url}/_lenient", max_queue_size=queue)

        def capture(user_id: str, event_type: str, properties: dict[str, Any]) -> object:
            return ph.capture(event_type, distinct_id=user_id, properties=properties)

        async def flush_posthog() -> None:
            await ph.flush(timeout_seconds=None)

        return capture, flush_posthog, ph.shutdown
    if sdk == "floor":
        return floor_queue()
    raise SystemExit(f"unknown sdk {sdk!r}")


def floor_queue() -> tuple[Track, Step, Step]:
    """The least an in-loop drain can do: encode the queue 100 events a step, send nothing."""
    import collections

    import orjson

    queue: collections.deque[tuple[str, str, float, bytes]] = collections.deque()
    dumps = orjson.dumps

    def enqueue(user_id: str, event_type: str, properties: dict[str, Any]) -> object:
        queue.append((user_id, event_type, time.time(), dumps(properties)))
        return None

    async def drain() -> None:
        start, step = time.perf_counter(), []
        gc.disable()  # the host's stalls alone (a full collection here takes 10 ms or more)
        while queue or time.perf_counter() - start < FLOOR_S:  # then the last step again
            if queue:  # popped a step at a time: freeing 100k events at once takes 10 ms too
                step = [queue.popleft() for _ in range(min(100, len(queue)))]
            b"[%b]" % b",".join(  # bytes only: nothing for the collector
                b'{"user":%b,"type":%b,"at":%b,"properties":%b}' % (dumps(u), dumps(e), dumps(t), p)
                for u, e, t, p in step
            )
            await asyncio.sleep(0)
        gc.enable()

    async def close() -> None:
        queue.clear()

    return enqueue, drain, close


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    n, tick = spec["n"], spec["tick_s"]
    track, flush, close = await open_client(spec["sdk"], spec["url"], n + 10_000)
    track(USER, EVENT_TYPE, {"amount_cents": 1})  # warm-up: the pool connects
    await flush()

    ticks: list[tuple[float, float]] = []  # (when the sleep started, how late it woke up)
    running = True

    async def ticker() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(tick)
            ticks.append((started, time.perf_counter() - started - tick))

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # the ticker's baseline before the burst
    t0 = time.perf_counter()
    for i in range(n):
        track(USER, EVENT_TYPE, {"amount_cents": 4900 + i % 1000, "plan": "pro", "attempt": i % 5})
    tracked = time.perf_counter()
    await asyncio.wait_for(flush(), spec["budget"])
    drained = time.perf_counter()
    running = False
    await ticking
    await asyncio.wait_for(close(), spec["budget"])

    lags = sorted(lag for started, lag in ticks if tracked <= started < drained)
    baseline = sorted(lag for started, lag in ticks if started + tick + lag < t0)
    return {
        "sdk": spec["sdk"],
        "loop": type(asyncio.get_running_loop()).__module__,
        "n": n,
        "track_loop_ms": (tracked - t0) * 1000,
        "drain_ms": (drained - tracked) * 1000,
        "total_ms": (drained - t0) * 1000,
        "max_stall_ms": lags[-1] * 1000 if lags else None,
        "p99_stall_ms": lags[int(0.99 * len(lags))] * 1000 if lags else None,
        "drain_ticks": len(lags),
        "idle_max_lag_ms": baseline[-1] * 1000 if baseline else None,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(burst(spec))
    else:
        result = uvloop.run(burst(spec))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
