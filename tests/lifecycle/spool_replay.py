"""A new process with the same spool: make the client, let it replay, close it.

Usage:
  spool_replay.py count N   flush until stats().replayed reaches N and nothing is pending
                            (at most 20 s), then aclose();
  spool_replay.py stdin     print `READY {}`, wait for a line on stdin, make the client and
                            print `STARTED {}`; then only wait (no track, no flush) for the next
                            line, and aclose().

Settings come from the WHISPERR_* environment (WHISPERR_SPOOL_PATH and the rest).
"""

from __future__ import annotations

import asyncio
import sys
import time

import probe  # before whisperr: see probe's docstring
import spool_common  # before whisperr: see its docstring

import whisperr

MODE = sys.argv[1]
REPLAY_TIMEOUT = 20.0


async def by_count(n: int) -> None:
    client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    probe.mark("client_made")
    deadline = time.monotonic() + REPLAY_TIMEOUT
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        result = await client.flush(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        stats = client.stats()
        if stats.replayed >= n and result.pending == 0 and not result.timed_out:
            break
        await asyncio.sleep(0.02)  # a claim is on its way from the spool's thread
    probe.mark("replayed")
    probe.note(rounds=rounds, before_close=spool_common.full_stats(client))
    await client.aclose(timeout=5)
    probe.note(closed=spool_common.full_stats(client))


async def by_stdin() -> None:
    spool_common.say("READY")
    await asyncio.to_thread(sys.stdin.readline)
    client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    probe.mark("client_made")
    spool_common.say("STARTED")
    await asyncio.to_thread(sys.stdin.readline)
    await client.aclose(timeout=5)
    probe.note(closed=spool_common.full_stats(client))


if MODE == "count":
    asyncio.run(by_count(int(sys.argv[2])))
else:
    asyncio.run(by_stdin())
