"""Track without end, in bursts, until killed: the SIGKILL case of tests/test_spool.py.

Usage: spool_burst.py BURST

Each burst tracks BURST events (message ids `burst-<i>`, properties {"i": i}), then prints
`PROGRESS {"next": i, "t": time.monotonic()}`: every event below index `next` was tracked
(track() had returned) at time `t`. Then it yields to the loop (asyncio.sleep(0.005)) so the
client can deliver, and goes on. It stops by itself after 30 s (a test that never kills it).
Settings come from the WHISPERR_* environment (spool_mode="always" and the rest).
"""

from __future__ import annotations

import asyncio
import sys
import time

import probe  # before whisperr: see probe's docstring
import spool_common  # before whisperr: see its docstring

import whisperr

BURST = int(sys.argv[1])
LIFE = 30.0


async def main() -> None:
    client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    end = time.monotonic() + LIFE
    i = 0
    while time.monotonic() < end:
        for _ in range(BURST):
            client.track(f"user_{i % 7}", "payment_failed", {"i": i}, message_id=f"burst-{i}")
            i += 1
        spool_common.say("PROGRESS", next=i, t=time.monotonic())
        await asyncio.sleep(0.005)
    await client.aclose(timeout=1)


asyncio.run(main())
