"""The durable spool: what it costs track(), and how fast it writes and replays.

    python benchmarks/spool.py [--calls 100000] [--rounds 7] [--replay 50000]

1. ``track()`` without a spool, with ``spool_path`` (``spool_mode="on_failure"``: nothing is
   written while delivery works) and with ``spool_mode="always"`` (every event journaled by the
   spool's worker thread, which runs meanwhile), alternated round by round in one process, a
   fresh client and spool file each round. Each round times ``--calls`` calls of
   ``track("user_8842", "payment_failed", {...3 keys...})``, yielding to the loop every 100
   calls as a service's request handler would (so the runner and the worker get their turns);
   the server address is never reached (capture only). Prints the median µs a call and the
   ratio to no spool.
2. The store alone (``whisperr._spool.Spool``): ``add()`` of 500-event batches, then ``claim()``
   and ``remove()`` of 500 at a time, in events/s.
3. End to end: ``--replay`` events left in a spool by a client whose server was down, then a
   new client replaying them to the bundled server (``python -m whisperr.server``, its own
   process): events/s from the client's creation until the file is empty, the server's count.

Prints the machine line first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import whisperr
from whisperr import _events as ev
from whisperr._spool import Spool

PROPERTIES = {"amount_cents": 4900, "currency": "eur", "plan": "pro"}
DOWN = "http://127.0.0.1:9"  # nothing listens: nothing is delivered


async def track_round(options: dict[str, Any], calls: int) -> float:
    client = whisperr.AsyncClient(
        api_key="wrk_bench",
        base_url=DOWN,
        max_queue_size=calls + 1000,
        flush_interval=3600,
        **options,
    )
    track = client.track
    for _ in range(1000):
        track("user_8842", "payment_failed", PROPERTIES)
    elapsed = 0.0
    for _ in range(calls // 100):
        started = time.perf_counter()
        for _ in range(100):
            track("user_8842", "payment_failed", PROPERTIES)
        elapsed += time.perf_counter() - started
        await asyncio.sleep(0)
    await client.aclose(timeout=0)
    return elapsed / calls * 1e6


def track_cost(calls: int, rounds: int, directory: Path) -> None:
    names = ("no spool", 'spool_mode="on_failure"', 'spool_mode="always"')
    timings: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names:
            path = directory / f"track-{index}-{len(timings[name])}.db"
            options: dict[str, Any] = {}
            if name != "no spool":
                options = {"spool_path": path, "spool_mode": name.split('"')[1]}
            timings[name].append(asyncio.run(track_round(options, calls)))
    base = statistics.median(timings["no spool"])
    print(f"\ntrack(): {calls:,} calls x {rounds} rounds, alternated")
    print(f"{'configuration':<26} {'median µs/call':>15} {'vs no spool':>12}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<26} {median:>15.2f} {median / base:>11.2f}x")


def store_throughput(events: int, directory: Path) -> None:
    store = Spool.open(str(directory / "store.db"), max_bytes=1 << 40)
    assert store is not None
    now = time.time()
    body = b'{"amount_cents":4900,"currency":"eur","plan":"pro"}'
    items: list[ev.Item] = [
        ("user_8842", "payment_failed", now + i * 1e-6, body, ev.new_message_id())
        for i in range(events)
    ]
    started = time.perf_counter()
    for start in range(0, events, 500):
        store.add(items[start : start + 500], owned=False)
    written = time.perf_counter() - started
    started = time.perf_counter()
    replayed = 0
    while claim := store.claim(500).items:
        store.remove(item[4] for item in claim)
        replayed += len(claim)
    read = time.perf_counter() - started
    store.close()
    assert replayed == events, (replayed, events)
    print(f"\nthe store: {events:,} events in batches of 500")
    print(f"  add():            {events / written:>12,.0f} events/s")
    print(f"  claim()+remove(): {events / read:>12,.0f} events/s")


def end_to_end(events: int, directory: Path) -> None:
    path = directory / "replay.db"

    async def fill() -> None:
        client = whisperr.AsyncClient(
            api_key="wrk_bench", base_url=DOWN, spool_path=path, max_queue_size=events + 1
        )
        for i in range(events):
            client.track("user_8842", "payment_failed", {"i": i})
        await client.aclose(timeout=0)

    asyncio.run(fill())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "whisperr.server", "--port", str(port), "--quiet"]
    command += ["--api-key", "wrk_bench"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{url}/_local/events", timeout=1, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

        async def replay() -> float:
            started = time.perf_counter()
            client = whisperr.AsyncClient(api_key="wrk_bench", base_url=url, spool_path=path)
            deadline = time.monotonic() + 120
            while client.stats().delivered < events and time.monotonic() < deadline:
                await client.flush()
                await asyncio.sleep(0.01)
            await client.aclose()
            return time.perf_counter() - started

        elapsed = asyncio.run(replay())
        stored = len(httpx.get(f"{url}/_local/events", trust_env=False).json()["events"])
        with contextlib.closing(sqlite3.connect(path)) as db:
            (left,) = db.execute("SELECT count(*) FROM events").fetchone()
    finally:
        server.terminate()
        server.wait(10)
    print(f"\nreplay end to end: {events:,} spooled events to a local server")
    print(f"  {events / elapsed:,.0f} events/s ({elapsed:.2f} s); stored {stored:,}, left {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--store", type=int, default=50_000, help="events for the store alone")
    parser.add_argument("--replay", type=int, default=50_000, help="events replayed end to end")
    args = parser.parse_args()
    logging.getLogger("whisperr").setLevel(logging.CRITICAL)  # the rounds' failures are expected
    print(
        f"{platform.python_implementation()} {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs, SQLite {sqlite3.sqlite_version}"
    )
    with tempfile.TemporaryDirectory() as directory:
        track_cost(args.calls, args.rounds, Path(directory))
        store_throughput(args.store, Path(directory))
        end_to_end(args.replay, Path(directory))


if __name__ == "__main__":
    main()
