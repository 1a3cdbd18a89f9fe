"""Case 8: a client made in the main thread's asyncio.run, used from a second loop in a thread.

Usage: second_loop.py MAIN
    idle     the main loop keeps running (awaits the thread) but never uses the client
    busy     the main loop tracks "second-main-0" first (its runner starts there), then awaits
    blocked  the main loop blocks in thread.join() until the thread is done

The thread runs its own asyncio.run(): 200 tracks, flush(timeout=5), then aclose(). Notes the
flush result and how long the flush and the aclose took.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import probe  # before whisperr: see probe's docstring

import whisperr

MAIN = sys.argv[1]
N = 200


def in_thread(client: whisperr.AsyncClient) -> None:
    async def other() -> None:
        for i in range(N):
            client.track(f"user_{i % 7}", "payment_failed", {"i": i}, message_id=f"second-{i}")
        started = time.monotonic()
        result = await client.flush(timeout=5)
        flushed = time.monotonic()
        await client.aclose()
        probe.note(
            flush_seconds=flushed - started,
            aclose_seconds=time.monotonic() - flushed,
            flush={"delivered": result.delivered, "pending": result.pending},
            flush_timed_out=result.timed_out,
        )

    try:
        asyncio.run(other())
    except BaseException as exc:
        probe.note(thread_error=repr(exc))
        raise


async def main() -> None:
    client: Any = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    if MAIN == "busy":
        client.track("user_main", "payment_failed", {"i": 0}, message_id="second-main-0")
        await asyncio.sleep(0)  # let the runner start in this loop
    thread = threading.Thread(target=in_thread, args=(client,))
    thread.start()
    if MAIN == "blocked":
        thread.join()
    else:
        await asyncio.to_thread(thread.join)
    probe.mark("main_returned")


asyncio.run(main())
probe.mark("run_returned")
