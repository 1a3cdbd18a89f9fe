"""Shared by the per-SDK workers. Standard library only: each worker runs in its SDK's own venv.

A worker is started as ``python bench_<sdk>.py '<json spec>'`` and prints exactly one line,
``RESULT {json}``, on stdout. The spec holds ``bench`` (track, e2e, latency, memory or faults),
``n`` (events), ``url`` (the server's base URL; for memory a closed port) and ``budget``
(seconds the worker may spend waiting for delivery before it reports that it did not finish).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

USERS = [f"user_{i:05d}" for i in range(1000)]
EVENT_TYPE = "payment_failed"
YIELD_EVERY = 100  # the caller yields to its event loop (or the GIL) every this many calls


def spec() -> dict[str, Any]:
    return json.loads(sys.argv[1])


def quiet_loggers(*names: str) -> None:
    """Failed deliveries are expected in some benchmarks; keep the SDKs' logs off stderr."""
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def props_cycle() -> list[dict[str, Any]]:
    """Prebuilt properties for the track() timing loop, so it times the SDK, not dict building."""
    return [{"amount_cents": 4900 + i, "plan": "pro", "attempt": i % 5} for i in range(1000)]


def fresh_props(i: int) -> dict[str, Any]:
    """A new properties dict per call, as a service builds one per event."""
    return {"amount_cents": 4900 + i % 1000, "plan": "pro", "attempt": i % 5}


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def finish(result: dict[str, Any]) -> None:
    """Print the result and leave at once: SDK threads stuck in a retry must not hold us up."""
    emit(result)
    sys.stderr.flush()
    os._exit(0)


class MemoryProbe:
    """tracemalloc around the tracking loop: traced bytes still alive afterwards, per event."""

    def start(self) -> None:
        gc.collect()
        tracemalloc.start(1)
        self._base = tracemalloc.get_traced_memory()[0]

    def stop(self, n: int) -> dict[str, Any]:
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        delta = current - self._base
        return {"bytes_total": delta, "bytes_per_event": delta / n, "peak_bytes": peak}


def run_blocking(fn: Callable[[], object], budget: float) -> tuple[bool, float]:
    """Run ``fn`` in a daemon thread for at most ``budget`` seconds: (returned, seconds)."""
    t0 = time.perf_counter()
    thread = threading.Thread(target=fn, name="bench-wait", daemon=True)
    thread.start()
    thread.join(budget)
    return not thread.is_alive(), time.perf_counter() - t0


def thread_sdk_main(
    name: str,
    version: str,
    make: Callable[[str, int], Any],
    track: Callable[[Any, int, dict[str, Any]], object],
    flush: Callable[[Any], object],
    shutdown: Callable[[Any], object],
) -> None:
    """The benchmarks for an SDK that queues on the caller's thread and sends from its own.

    ``make(url, max_queue_size)`` builds a client; ``track(client, i, props)`` queues one event;
    ``flush`` and ``shutdown`` are the SDK's own calls.
    """
    s = spec()
    bench, n, url, budget = s["bench"], s["n"], s["url"], s["budget"]
    out: dict[str, Any] = {"sdk": name, "version": version, "bench": bench, "n": n}
    queue_size = n + 10_000

    if bench == "track":
        client = make(url, queue_size)
        cycle = props_cycle()
        for i in range(1000):  # warm up: first connection, lazy imports
            track(client, i, cycle[i])
        flush(client)
        t0 = time.perf_counter()
        for i in range(n):
            track(client, i, cycle[i % 1000])
            if i % YIELD_EVERY == 0:
                time.sleep(0)
        elapsed = time.perf_counter() - t0
        out["us_per_call"] = elapsed / n * 1e6
        out["n_sent"] = n + 1000
        returned, _ = run_blocking(lambda: shutdown(client), budget)
        out["returned"] = returned
        finish(out)

    if bench in ("e2e", "latency", "faults"):
        client = make(url, queue_size)

        def work() -> None:
            for i in range(n):
                track(client, i, fresh_props(i))
                if i % YIELD_EVERY == 0:
                    time.sleep(0)
            if bench == "faults":
                flush(client)
            shutdown(client)

        returned, elapsed = run_blocking(work, budget)
        out.update(returned=returned, seconds=elapsed, n_sent=n)
        if returned:
            out["events_per_s"] = n / elapsed
        finish(out)

    if bench == "memory":
        client = make(url, queue_size)
        track(client, 0, fresh_props(0))  # warm up: the sender thread starts and fails
        time.sleep(0.5)
        probe = MemoryProbe()
        probe.start()
        for i in range(n):
            track(client, i, fresh_props(i))
            if i % YIELD_EVERY == 0:
                time.sleep(0)
        out.update(probe.stop(n))
        finish(out)

    raise SystemExit(f"unknown bench {bench!r}")
