"""track() with the hooks and metrics of the client on and off, side by side in one run.

    python benchmarks/hooks.py [--calls 100000] [--rounds 7]

Configurations, alternated round by round in one process (a fresh client each time, so each
round starts from the same state): no hooks; ``before_send`` set to an identity function;
``pii="raise"``; both; ``metrics=True`` on an OpenTelemetry SDK ``MeterProvider`` (skipped
when ``opentelemetry-sdk`` is missing). Each round times ``--calls`` calls of
``track("user_8842", "payment_failed", {...3 keys...})`` without yielding to a loop (capture
only: nothing is delivered), then closes with ``aclose(timeout=0)``. Prints the median µs a
call and its ratio to no hooks, and the machine line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import whisperr

PROPERTIES = {"amount_cents": 4900, "currency": "eur", "plan": "pro"}


def identity(event: dict[str, Any]) -> dict[str, Any]:
    return event


def configurations() -> dict[str, Callable[[], dict[str, Any]]]:
    found: dict[str, Callable[[], dict[str, Any]]] = {
        "no hooks": dict,
        "before_send=identity": lambda: {"before_send": identity},
        'pii="raise"': lambda: {"pii": "raise"},
        'before_send + pii="raise"': lambda: {"before_send": identity, "pii": "raise"},
    }
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        print("opentelemetry-sdk is missing: metrics=True is not measured")
    else:
        found["metrics on"] = lambda: {
            "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])
        }
    return found


async def one_round(options: dict[str, Any], calls: int) -> float:
    client = whisperr.AsyncClient(
        api_key="wrk_bench",
        base_url="http://127.0.0.1:9",  # never reached: nothing is delivered in the round
        max_queue_size=calls + 1000,
        flush_interval=3600,
        **options,
    )
    track = client.track
    for _ in range(1000):
        track("user_8842", "payment_failed", PROPERTIES)
    started = time.perf_counter()
    for _ in range(calls):
        track("user_8842", "payment_failed", PROPERTIES)
    elapsed = time.perf_counter() - started
    await client.aclose(timeout=0)
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("whisperr").setLevel(logging.ERROR)  # each round drops its queue at close
    found = configurations()
    timings: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(args.rounds):
        for name, options in found.items():
            timings[name].append(asyncio.run(one_round(options(), args.calls)))
    print(
        f"{platform.python_implementation()} {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs; {args.calls:,} calls x {args.rounds} rounds"
    )
    base = statistics.median(timings["no hooks"])
    print(f"{'configuration':<28} {'median µs/call':>15} {'vs no hooks':>12}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:>15.2f} {median / base:>11.2f}x")


if __name__ == "__main__":
    main()
