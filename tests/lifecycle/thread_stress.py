"""Case 9: 8 threads x 5,000 track() calls on one client, repeated in one process.

Usage: thread_stress.py KIND REPS
    KIND  sync:  a whisperr.Client() per repetition, tracked from plain threads, close()d
          async: a whisperr.AsyncClient() per repetition made in asyncio.run(); the threads
                 track while that loop runs, then it awaits aclose()

sys.setswitchinterval(1e-5) makes the threads switch far more often than usual. Every track()
call is guarded: an exception escaping it is collected (with its thread), and the thread goes
on. After each repetition it prints `REP {json}` (stats, exceptions, reports) and waits for a
line on stdin, so that the test can check and reset the server before the next one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

import probe  # before whisperr: see probe's docstring

import whisperr

KIND, REPS = sys.argv[1], int(sys.argv[2])
THREADS, CALLS = 8, 5000
KEEP_ERRORS = 20  # keep the first exceptions of a repetition; count them all


def start_threads(client: Any, rep: int, errors: list[str], count: list[int]) -> list[Any]:
    lock = threading.Lock()

    def work(n: int) -> None:
        track = client.track
        for i in range(CALLS):
            try:
                track(f"user_{n}", "payment_failed", {"i": i}, message_id=f"r{rep}-t{n}-{i}")
            except Exception as exc:
                with lock:
                    count[0] += 1
                    if len(errors) < KEEP_ERRORS:
                        errors.append(f"thread {n}, call {i}: {exc!r}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    return threads


def join_all(threads: list[Any]) -> None:
    for thread in threads:
        thread.join()


def sync_rep(rep: int, errors: list[str], count: list[int]) -> dict[str, Any]:
    client = whisperr.Client(on_error=probe.on_error)
    join_all(start_threads(client, rep, errors, count))
    client.close()
    return probe.stats(client)


async def async_rep(rep: int, errors: list[str], count: list[int]) -> dict[str, Any]:
    client = whisperr.AsyncClient(on_error=probe.on_error)
    threads = start_threads(client, rep, errors, count)
    await asyncio.to_thread(join_all, threads)
    await client.aclose()
    return probe.stats(client)


def main() -> None:
    sys.setswitchinterval(1e-5)
    for rep in range(REPS):
        probe.rearm()  # LIFECYCLE_DUMP_AFTER counts for one repetition
        errors: list[str] = []
        count = [0]
        if KIND == "sync":
            stats = sync_rep(rep, errors, count)
        else:
            stats = asyncio.run(async_rep(rep, errors, count))
        line = {
            "rep": rep,
            "stats": stats,
            "exceptions": count[0],
            "first_exceptions": errors,
            "reports": probe.take_reports(),
        }
        print("REP " + json.dumps(line), flush=True)
        if sys.stdin.readline() != "next\n":
            return


main()
