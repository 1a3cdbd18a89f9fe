"""CPU per request: httpx's default transport against this SDK's, side by side in one run.

    python benchmarks/transport.py [--rounds 10] [--requests 200]

Both post the same 500-event batch bodies (about 124 kB) the way the SDK does (one
``httpx.AsyncClient``, a prebuilt URL and headers, keep-alive) to the bundled server in its own
process on 127.0.0.1. The rounds alternate between the two transports; each round reports the
process CPU time per request (``time.process_time``, so the server's work is not counted), and
the medians and their ratio are printed with the machine line. It also times making the client,
which for httpx's transport includes loading the CA bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Server, machine_line

from whisperr._http11 import Http1Transport
from whisperr._transport import request_headers

Factory = Callable[[], httpx.AsyncClient]
FACTORIES: dict[str, Factory] = {
    "httpx default": lambda: httpx.AsyncClient(trust_env=False),
    "whisperr Http1Transport": lambda: httpx.AsyncClient(
        transport=Http1Transport(max_idle=16), trust_env=False
    ),
}


def bodies(count: int) -> list[bytes]:
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


async def one_round(make: Factory, url: httpx.URL, payloads: list[bytes]) -> tuple[float, float]:
    """CPU µs per request, and ms to make the client."""
    started = time.perf_counter()
    client = make()
    made = (time.perf_counter() - started) * 1e3
    headers = request_headers("wrk_bench")
    async with client:
        await client.post(url, content=payloads[0], headers=headers)  # connect outside the timing
        cpu = time.process_time()
        for body in payloads:
            response = await client.post(url, content=body, headers=headers, timeout=10)
            if response.status_code != 202:
                raise SystemExit(f"the server answered {response.status_code}")
        return (time.process_time() - cpu) / len(payloads) * 1e6, made


async def main(url: str, rounds: int, requests: int) -> None:
    target = httpx.URL(url + "/v1/events/batch")
    payloads = bodies(requests)
    cpu: dict[str, list[float]] = {name: [] for name in FACTORIES}
    make: dict[str, list[float]] = {name: [] for name in FACTORIES}
    for _ in range(rounds):
        for name, factory in FACTORIES.items():
            per_request, made = await one_round(factory, target, payloads)
            cpu[name].append(per_request)
            make[name].append(made)
    print(f"Machine: {machine_line()}")
    print(f"{rounds} alternated rounds of {requests} requests of {len(payloads[0]):,} bytes\n")
    print("| transport | CPU µs a request (median) | every round | making the client, ms |")
    print("|---|---:|---|---:|")
    for name in FACTORIES:
        rounds_text = " ".join(f"{v:.0f}" for v in cpu[name])
        line = f"| {name} | {statistics.median(cpu[name]):.0f} | {rounds_text} |"
        print(f"{line} {statistics.median(make[name]):.1f} |")
    default, ours = (statistics.median(v) for v in cpu.values())
    print(f"\nours ÷ httpx default: {ours / default:.2f}x CPU per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with Server(Path(sys.executable)) as server:
        asyncio.run(main(server.url, args.rounds, args.requests))
