"""Worker for this repository's asyncio SDK (``whisperr.AsyncClient``), defaults except queue size.

The caller runs inside an event loop with the client open and yields with
``await asyncio.sleep(0)`` every 100 calls, as a service handling requests would. With
``"transport": "httpx"`` in the spec (benchmarks/transport.py) the client gets
``transport=httpx.AsyncHTTPTransport()`` instead of its default; ``cpu_s`` is the process CPU
time of the timed part of e2e, latency and faults.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _common
import httpx

import whisperr
from whisperr import AsyncClient


def make(url: str, queue_size: int, transport: str | None) -> AsyncClient:
    chosen = httpx.AsyncHTTPTransport() if transport == "httpx" else None
    return AsyncClient(
        api_key="wrk_bench", base_url=url, max_queue_size=queue_size, transport=chosen
    )


async def main(s: dict[str, Any]) -> dict[str, Any]:
    bench, n, url, budget = s["bench"], s["n"], s["url"], s["budget"]
    out: dict[str, Any] = {"sdk": "ours", "version": whisperr.__version__, "bench": bench, "n": n}
    out["file"] = whisperr.__file__
    users, event_type, every = _common.USERS, _common.EVENT_TYPE, _common.YIELD_EVERY
    async with make(url, n + 10_000, s.get("transport")) as client:
        track = client.track
        if bench == "track":
            cycle = _common.props_cycle()
            for i in range(1000):  # warm up: first connection, lazy imports
                track(users[i % 1000], event_type, cycle[i])
                if i % every == 0:
                    await asyncio.sleep(0)
            await client.flush(timeout=budget)
            t0 = time.perf_counter()
            for i in range(n):
                track(users[i % 1000], event_type, cycle[i % 1000])
                if i % every == 0:
                    await asyncio.sleep(0)
            out["us_per_call"] = (time.perf_counter() - t0) / n * 1e6
            out["n_sent"] = n + 1000
            result = await client.aclose(timeout=budget)
            out["returned"] = not result.timed_out
        elif bench in ("e2e", "latency", "faults"):
            deadline = time.perf_counter() + budget
            t0, cpu = time.perf_counter(), time.process_time()
            for i in range(n):
                track(users[i % 1000], event_type, _common.fresh_props(i))
                if i % every == 0:
                    await asyncio.sleep(0)
            timed_out = False
            if bench == "faults":
                flushed = await client.flush(timeout=max(0.0, deadline - time.perf_counter()))
                timed_out = flushed.timed_out
            result = await client.aclose(timeout=max(0.0, deadline - time.perf_counter()))
            elapsed = time.perf_counter() - t0
            out["cpu_s"] = time.process_time() - cpu
            stats = client.stats()
            out.update(returned=not (timed_out or result.timed_out), seconds=elapsed, n_sent=n)
            out.update(delivered=stats.delivered, dropped=stats.dropped, retried=stats.retried)
            if out["returned"]:
                out["events_per_s"] = n / elapsed
        elif bench == "memory":
            track(users[0], event_type, _common.fresh_props(0))  # warm up: the runner fails
            await asyncio.sleep(0.5)
            probe = _common.MemoryProbe()
            probe.start()
            for i in range(n):
                track(users[i % 1000], event_type, _common.fresh_props(i))
                if i % every == 0:
                    await asyncio.sleep(0)
            out.update(probe.stop(n))
            _common.finish(out)  # leave without waiting for the unreachable server
        else:
            raise SystemExit(f"unknown bench {bench!r}")
    return out


if __name__ == "__main__":
    _common.quiet_loggers("whisperr", "httpx", "httpcore")
    _common.finish(asyncio.run(main(_common.spec())))
